"""OpenAI-compatible chat-completions backend (``vllm serve``, TGI, llama.cpp, ...).

One HTTP request per conversation, ``max_concurrency`` in flight (a thread
pool over one keep-alive client), so the server batches them itself (vLLM's
continuous batching and automatic prefix caching give the prefix sharing that
the in-process backend does by hand).

Failure policy:
- transient (connection errors, timeouts, 429, 5xx): retried with exponential
  backoff (``backoff_s * 2**attempt``, or the server's Retry-After when it
  sends one), then ``PolicyError`` naming the URL and the last failure;
- anything else 4xx (bad key, unknown model, bad request): no retry, an
  immediate ``PolicyHTTPError`` with the status, the URL and the body excerpt,
  marked ``retryable=False`` so orchestration need not retry it either.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import httpx

from ipr_core.policies.base import PolicyError, SamplingParams
from ipr_core.policies.tiny import IM_END
from ipr_core.types import Message

log = logging.getLogger(__name__)

# Seeds are 63-bit (seeding.derive_seed); several servers take 32-bit seeds
# (llama.cpp), so send them reduced: still distinct enough for rollouts.
_SEED_MOD = 2**31 - 1


class PolicyHTTPError(PolicyError):
    """The server answered with an error status."""

    def __init__(self, message: str, *, status: int, url: str, retryable: bool):
        super().__init__(message)
        self.status = status
        self.url = url
        self.retryable = retryable


@dataclass
class HTTPStats:
    requests: int = 0  # HTTP attempts, retries included
    retries: int = 0
    completions: int = 0
    generated_tokens: int = 0  # the servers' usage.completion_tokens (0 where a server does not report usage)


class OpenAIChatPolicy:
    """``Policy`` over an OpenAI-compatible ``/chat/completions`` endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout_s: float = 60.0,
        max_concurrency: int = 16,
        max_retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        stop: Sequence[str] = (IM_END,),
        extra_body: dict[str, Any] | None = None,
        send_seed: bool = True,
    ):
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(f"invalid HTTP settings: max_concurrency={max_concurrency}, max_retries={max_retries}, timeout_s={timeout_s}, backoff_s={backoff_s}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        # A ChatML server stops at <|im_end|> anyway; sending it also protects
        # servers whose template does not mark it as eos. Empty = send none.
        self.stop = list(stop)
        self.extra_body = dict(extra_body or {})
        self.send_seed = send_seed
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            timeout=httpx.Timeout(timeout_s),
            headers=headers,
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="ipr-http")
        self._lock = threading.Lock()
        self.stats = HTTPStats()

    def payload(self, conversation: Sequence[Message], sampling: SamplingParams, seed: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in conversation],
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_new_tokens,
            "n": 1,
        }
        if self.send_seed:
            body["seed"] = int(seed) % _SEED_MOD
        if self.stop:
            body["stop"] = self.stop
        body.update(self.extra_body)
        return body

    def generate(self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams, seeds: Sequence[int]) -> list[str]:
        if len(conversations) != len(seeds):
            raise ValueError(f"{len(conversations)} conversations but {len(seeds)} seeds")
        futures = [self._pool.submit(self._complete, self.payload(c, sampling, s)) for c, s in zip(conversations, seeds)]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:  # do not keep hammering a server that already failed us
                f.cancel()
            raise

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()

    # --- one request --------------------------------------------------------------------

    def _count(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _complete(self, body: dict[str, Any]) -> str:
        last = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count(retries=1)
            self._count(requests=1)
            wait: float | None = None
            try:
                r = self._client.post(self.url, json=body)
            except httpx.TimeoutException:
                last = f"timed out after {self.timeout_s}s"
            except httpx.TransportError as e:
                last = f"connection error: {type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    text, tokens = self._content(r)
                    self._count(completions=1, generated_tokens=tokens)
                    return text
                excerpt = r.text[:300]
                if r.status_code == 429 or r.status_code >= 500:
                    last = f"HTTP {r.status_code}: {excerpt}"
                    wait = _retry_after(r)
                else:
                    raise PolicyHTTPError(
                        f"{self.url} answered HTTP {r.status_code} (not retried; check base_url, model {self.model!r} and the API key): {excerpt}",
                        status=r.status_code,
                        url=self.url,
                        retryable=False,
                    )
            if attempt < self.max_retries:
                delay = min(self.max_backoff_s, wait if wait is not None else self.backoff_s * 2**attempt)
                log.debug("%s: %s; retry %d/%d in %.2fs", self.url, last, attempt + 1, self.max_retries, delay)
                time.sleep(delay)
        raise PolicyError(f"{self.url}: giving up after {self.max_retries + 1} attempts; last error: {last}")

    def _content(self, r: httpx.Response) -> tuple[str, int]:
        """The reply's text, and the tokens the server says it generated."""
        try:
            body = r.json()
            msg = body["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise PolicyError(f"{self.url} returned HTTP 200 without choices[0].message: {r.text[:300]}") from None
        usage = body.get("usage") if isinstance(body, dict) else None
        tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
        return msg.get("content") or "", int(tokens) if isinstance(tokens, int) else 0


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return max(0.0, float(r.headers["retry-after"]))
    except (KeyError, ValueError):
        return None  # absent, or an HTTP date: fall back to exponential backoff
