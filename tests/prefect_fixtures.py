"""A real local Prefect server for pipeline tests (subprocess, free port, temp home)."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def run_prefect_server(home: Path, server_env: dict | None = None, ui: bool = False):
    """`prefect server start` on 127.0.0.1 on a free port, stopped by PID; yields (api_url, env for subprocesses).

    ``server_env`` adds settings for the server process only (e.g. a faster scheduler loop);
    ``ui`` serves the web UI too, pointed at this server's API. The log is ``home / "server.log"``.
    """
    port = free_port()
    env = prefect_env(home)
    env.update(server_env or {})
    env["PREFECT_SERVER_API_PORT"] = str(port)
    if ui:
        env.update(PREFECT_UI_ENABLED="true", PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{port}/api"
    try:
        wait_for_http(api + "/health", proc, 180, "prefect server", home / "server.log")
        yield api, prefect_env(home, api)
    finally:
        stop_process_group(proc)
        log.close()


def stop_process_group(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group of ``proc`` (started with start_new_session=True), then SIGKILL it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the leader's children too, if any outlived it
    proc.wait(grace_s)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """`prefect server start` on 127.0.0.1; yields (api_url, env for subprocesses)."""
    with run_prefect_server(tmp_path_factory.mktemp("prefect-home")) as server:
        yield server


# The scheduler's main loop runs every 60 s by default; a test server runs it every 2 s.
FAST_SCHEDULER_ENV = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"}


@pytest.fixture(scope="module")
def prefect_server_fast_scheduler(tmp_path_factory):
    """A server of its own whose scheduler loops every 2 s; yields (api_url, env). Log: $PREFECT_HOME/server.log."""
    with run_prefect_server(tmp_path_factory.mktemp("prefect-sched-home"), FAST_SCHEDULER_ENV) as server:
        yield server
