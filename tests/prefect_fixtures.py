"""A real local Prefect server for pipeline tests (subprocess, free port, temp home)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import free_port

VENV_BIN = Path(sys.executable).parent


def prefect_env(home: Path, api_url: str | None = None) -> dict:
    env = os.environ.copy()
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_EXTRA_LOGGERS="ipr_core",
        PREFECT_SERVER_API_HOST="127.0.0.1",
        IPR_CACHE_DIR=str(home / "cache"),
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1; yields (api_url, env for subprocesses)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = prefect_env(home)
    env["PREFECT_SERVER_API_PORT"] = str(port)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(api + "/health", timeout=2)
            break
        except Exception:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("prefect server did not start in 180 s")
    try:
        yield api, prefect_env(home, api)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
