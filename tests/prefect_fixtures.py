"""A real local Prefect server for pipeline tests (subprocess, free port, temp home)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, wait_for_http

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
    wait_for_http(api + "/health", proc, 180, "prefect server", home / "server.log")
    try:
        yield api, prefect_env(home, api)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
