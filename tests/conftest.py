"""Shared fixtures: a real S3 API (moto_server on 127.0.0.1), isolated Prefect home."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# ipr_core's log lines in tests that call it outside a flow run: Prefect's API
# handler would warn for each that it has no flow run to send them to.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
SHARED_DATA = Path(os.environ.get("IPR_SHARED_DATA", ROOT.parent / "shared" / "data"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout_s: float, name: str, log_path: Path | None = None) -> None:
    """Wait until ``url`` answers; fail (killing ``proc``'s group) if it exits or times out."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            if proc.poll() is not None:
                tail = log_path.read_text()[-2000:] if log_path else ""
                pytest.fail(f"{name} exited with {proc.returncode}: {tail}")
            time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"{name} did not start in {timeout_s:.0f} s")


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 API: moto_server on 127.0.0.1 on a free port, stopped by PID."""
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    if not Path(exe).exists():
        pytest.fail("moto_server not found: install the dev extra (moto[server])")
    port = free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(url, proc, 30, "moto_server")
    old = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    try:
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def s3_bucket(endpoint: str) -> str:
    """A fresh bucket on the S3 API at ``endpoint``; returns ``s3://bucket/runs``."""
    import fsspec

    fsspec.config.conf.pop("s3", None)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    bucket = f"ipr-{uuid.uuid4().hex[:10]}"
    fs.mkdir(bucket)
    return f"s3://{bucket}/runs"


@pytest.fixture
def s3_root(moto_server):
    """A fresh bucket on the moto server; returns ``s3://bucket/runs``."""
    return s3_bucket(moto_server)
