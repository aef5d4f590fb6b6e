"""The OpenAI-compatible backend against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ipr_core.policies.base import Policy, PolicyError, SamplingParams
from ipr_core.policies.openai_http import OpenAIChatPolicy, PolicyHTTPError

CONV = [{"role": "system", "content": "sys"}, {"role": "user", "content": "go"}]
SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=16)


class FakeServer:
    """A chat-completions endpoint whose failures are scripted per request number.

    ``script`` maps a 0-based request number to a status code, or to "slow"
    (sleep past the client's timeout); unlisted requests succeed, answering
    with the seed and the last user message so order mix-ups are visible.
    """

    def __init__(self, script=None, default=200, delay_s=0.0):
        self.script = dict(script or {})
        self.default = default
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.requests)
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    action = server.script.get(n, server.default)
                    if self.path != "/v1/chat/completions":
                        action = 404
                    if action == "slow":
                        time.sleep(1.0)
                        action = 200
                    time.sleep(server.delay_s)
                finally:
                    # Before the reply is written: once the client has it, it may send its next
                    # request, which must not find this one still counted.
                    with server.lock:
                        server.in_flight -= 1
                if action == 200:
                    text = f"Thought: ok\nAction: {body['seed']}-{body['messages'][-1]['content']}"
                    usage = {"prompt_tokens": 9, "completion_tokens": len(text.split()), "total_tokens": 9 + len(text.split())}
                    self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}], "usage": usage})
                else:
                    self._send(action, {"error": {"message": f"scripted failure {action}", "code": action}}, {"Retry-After": "0"} if action == 429 else {})

            def _send(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _policy(url, **kw):
    kw = {"timeout_s": 5.0, "max_concurrency": 4, "max_retries": 3, "backoff_s": 0.01, **kw}
    return OpenAIChatPolicy(url, "tiny-agent", api_key="sk-test", **kw)


def test_answers_in_order_with_all_sampling_fields_and_bounded_concurrency():
    convs = [CONV[:1] + [{"role": "user", "content": f"q{i}"}] for i in range(10)]
    with FakeServer(delay_s=0.05) as srv:
        p = _policy(srv.url, max_concurrency=3)
        assert isinstance(p, Policy)
        out = p.generate(convs, SAMPLING, list(range(100, 110)))
        p.close()
    assert out == [f"Thought: ok\nAction: {100 + i}-q{i}" for i in range(10)]
    body = srv.requests[0]
    assert {k: body[k] for k in ("model", "temperature", "top_p", "max_tokens", "stop", "n")} == {
        "model": "tiny-agent", "temperature": 0.7, "top_p": 0.9, "max_tokens": 16, "stop": ["<|im_end|>"], "n": 1,
    }
    assert sorted(r["seed"] for r in srv.requests) == list(range(100, 110))
    assert srv.headers[0]["Authorization"] == "Bearer sk-test"
    assert 1 < srv.max_in_flight <= 3
    assert p.stats.completions == 10 and p.stats.generated_tokens == 10 * 4  # 4 words per reply: the server's usage.completion_tokens


@pytest.mark.parametrize("status", [503, 500, 429])
def test_retries_transient_failures_then_succeeds(status):
    with FakeServer(script={0: status, 1: status}) as srv:
        p = _policy(srv.url)
        assert p.generate([CONV], SAMPLING, [7]) == ["Thought: ok\nAction: 7-go"]
        p.close()
    assert len(srv.requests) == 3 and p.stats.retries == 2


def test_gives_up_after_max_retries_with_a_clear_error():
    with FakeServer(default=503) as srv:
        p = _policy(srv.url, max_retries=2)
        with pytest.raises(PolicyError) as e:
            p.generate([CONV], SAMPLING, [1])
        p.close()
    assert len(srv.requests) == 3
    msg = str(e.value)
    assert "giving up after 3 attempts" in msg and "HTTP 503" in msg and srv.url in msg and "scripted failure" in msg


def test_auth_and_client_errors_fail_at_once_without_retry():
    with FakeServer(default=401) as srv:
        p = _policy(srv.url)
        with pytest.raises(PolicyHTTPError) as e:
            p.generate([CONV], SAMPLING, [1])
        p.close()
    assert len(srv.requests) == 1
    assert e.value.status == 401 and e.value.retryable is False and isinstance(e.value, PolicyError)
    assert "HTTP 401" in str(e.value) and srv.url + "/chat/completions" in str(e.value) and "scripted failure 401" in str(e.value)


def test_timeouts_are_retried_and_reported():
    with FakeServer(script={0: "slow"}) as srv:
        p = _policy(srv.url, timeout_s=0.3)
        assert p.generate([CONV], SAMPLING, [3]) == ["Thought: ok\nAction: 3-go"]
        p.close()
    with FakeServer(default="slow") as srv:
        p = _policy(srv.url, timeout_s=0.2, max_retries=1)
        with pytest.raises(PolicyError, match="timed out after 0.2s"):
            p.generate([CONV], SAMPLING, [3])
        p.close()


def test_connection_refused_is_retried_then_reported():
    with FakeServer() as srv:
        url = srv.url
    p = _policy(url, max_retries=2)  # nothing listens there any more
    t0 = time.time()
    with pytest.raises(PolicyError, match="connection error"):
        p.generate([CONV], SAMPLING, [1])
    assert p.stats.requests == 3 and time.time() - t0 < 5
    p.close()


def test_malformed_success_body_is_an_error():
    with FakeServer(default=200) as srv:
        srv.httpd.RequestHandlerClass.do_POST = lambda h: (h.rfile.read(int(h.headers["Content-Length"])), h._send(200, {"nope": 1}))
        p = _policy(srv.url)
        with pytest.raises(PolicyError, match="without choices"):
            p.generate([CONV], SAMPLING, [1])
        p.close()
