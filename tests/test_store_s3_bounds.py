"""Object-store waits are bounded by the run's config (storage.connect_timeout_s,
read_timeout_s, max_attempts): a stalled endpoint is an error, not a hang."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from ipr_core import store
from ipr_core.config import IPRConfig
from ipr_core.pipeline import client_options


@pytest.fixture()
def silent_endpoint(monkeypatch):
    """An S3 endpoint that accepts connections and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)  # the kernel completes handshakes; nothing ever replies
        port = s.getsockname()[1]
        for k, v in {"AWS_ACCESS_KEY_ID": "fake", "AWS_SECRET_ACCESS_KEY": "fake", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}.items():
            monkeypatch.setenv(k, v)
        yield port


def _timed_read(uri: str, opts: store.ClientOptions, limit_s: float) -> tuple[float, BaseException | None]:
    """Read ``uri`` under ``opts`` on a thread; (seconds, the error) or a failure when it outlives ``limit_s``."""
    got: list = []

    def read():
        t0 = time.perf_counter()
        try:
            store.read_bytes(uri)
            got.append((time.perf_counter() - t0, None))
        except BaseException as e:  # noqa: BLE001 - the error is the result
            got.append((time.perf_counter() - t0, e))

    with store.client_options(opts):
        t = threading.Thread(target=__import__("contextvars").copy_context().run, args=(read,), daemon=True)
        t.start()
        t.join(limit_s)
    assert got, f"a read from a stalled endpoint was still waiting after {limit_s} s"
    return got[0]


def test_a_stalled_endpoint_fails_after_the_configured_attempts(silent_endpoint):
    cfg = IPRConfig.model_validate({"storage": {"root": "s3://bucket/runs", "connect_timeout_s": 1, "read_timeout_s": 1, "max_attempts": 2}})
    opts = client_options(cfg)
    assert opts == store.ClientOptions(1.0, 1.0, 2)
    elapsed, err = _timed_read("s3://bucket/runs/x/_MANIFEST.json", opts, limit_s=60)
    assert err is not None
    # 2 attempts of a 1 s read timeout, plus botocore's backoff; s3fs's own 5 retries would make it >= 10 s
    assert 2.0 <= elapsed < 10.0, elapsed


def test_more_attempts_wait_longer(silent_endpoint):
    """The bound follows the config (the test above is not passing by accident)."""
    short, _ = _timed_read("s3://bucket/a", store.ClientOptions(1, 1, 1), limit_s=60)
    long, _ = _timed_read("s3://bucket/b", store.ClientOptions(1, 1, 4), limit_s=60)
    assert long >= short + 2.5, (short, long)


def test_the_options_reset_after_the_block():
    with store.client_options(store.ClientOptions(2, 3, 4)):
        assert store._CLIENT.get().max_attempts == 4
    assert store._CLIENT.get() == store.ClientOptions()
