"""Which OpenAI-compatible server generates for a checkpoint, checked by what
the server says it serves (``model.backend=openai``, ``model.server``).

A stage that generates with checkpoint C asks ``connect(model_cfg, C)`` for a
server. The name every request sends is C's **served name**, derived from C's
content digest (``served_name``), and before the first request the stage
confirms on ``GET /v1/models`` that its server lists that name; the identity
the server reported goes into the stage's manifest. A server that serves
something else is never used: the stage fails before generating.

Modes (``model.server.mode``):
- ``external``: servers you run, listed in ``model.server.urls`` (one per
  role, e.g. scorer and policy); the first that lists C's served name is used.
  Start them with ``--served-model-name <served name>`` (the error names it).
- ``managed``: this process starts a server for C (``model.server.python`` /
  ``args``, vLLM's own environment) on a free port of 127.0.0.1, waits for
  it, and stops it by process group: when a stage needs another checkpoint
  and ``max_servers`` are running (the least recently used idle one goes),
  and when the process exits. A server already serving C is reused, and one
  that died is started again.
- ``reload``: like managed, but an idle server is given C's weights in place
  (vLLM's ``reload_weights`` through ``/collective_rpc``, needs
  ``VLLM_SERVER_DEV_MODE=1``, set here) and its prefix cache is reset, instead
  of starting a new process. Its served name is a slot name, since the
  weights behind it change, so the identity recorded is the checkpoint this
  process loaded into it, with the reload and the reset the server
  acknowledged.
- ``lora``: like managed, but servers start with vLLM's LoRA support and a
  checkpoint that carries an adapter (``training.ipr.lora=true``;
  ``ipr_core.policies.adapters``) is served as that adapter on the server of
  its base: the adapter is loaded at run time (``/v1/load_lora_adapter``,
  needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, set here) under the
  checkpoint's served name, and each request selects it by that name. The
  identity recorded is the adapter as the server lists it: its name, the
  folder it was loaded from and its parent, the base's served name.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx

from ipr_core.policies.adapters import Base, adapter_dir, read_base
from ipr_core.policies.base import PolicyError

log = logging.getLogger(__name__)

VLLM_SERVER = ("-m", "vllm.entrypoints.openai.api_server")
GUARD = Path(__file__).with_name("server_guard.py")


def served_name(digest: str) -> str:
    """The model name a checkpoint is served and requested under."""
    return f"ckpt-{digest}"


class ServerError(PolicyError):
    """No server serves the checkpoint, or a managed server would not start.
    Not transient: retrying the stage cannot change what is served."""

    retryable = False


@dataclass(frozen=True)
class Served:
    """A server a stage generates with: where, under which name, and what it reported."""

    base_url: str
    model: str
    identity: dict[str, Any]


def listed_models(base_url: str, timeout_s: float = 10.0) -> list[dict]:
    """``GET {base_url}/models``: the models the server says it serves."""
    r = httpx.get(base_url.rstrip("/") + "/models", timeout=timeout_s)
    r.raise_for_status()
    return list(r.json().get("data") or [])


def _listing(base_url: str) -> list[dict] | str:
    """The server's models, or why it could not say."""
    try:
        return listed_models(base_url)
    except (httpx.HTTPError, ValueError) as e:
        return f"unreachable ({type(e).__name__})"


def _identity(base_url: str, name: str, mode: str, models: list[dict] | str | None = None) -> dict[str, Any] | None:
    """What the server reports for ``name`` (in ``models``, else asked now), or None when it does not list it."""
    models = _listing(base_url) if models is None else models
    for m in models if isinstance(models, list) else ():
        if m.get("id") == name:
            parent = {"parent": m["parent"]} if m.get("parent") else {}
            return {"mode": mode, "url": base_url, "served_model": name, "root": m.get("root"), **parent, "listed": [x.get("id") for x in models]}
    return None


def external_urls(model_cfg: Any) -> list[str]:
    """The external servers: ``model.server.urls``, else ``model.openai.base_url``."""
    return model_cfg.server.urls or [model_cfg.openai.base_url]


def check_external(urls: list[str], digest: str, uri: str) -> Served:
    """The first of ``urls`` that lists ``digest``'s served name; ServerError naming what each serves otherwise."""
    name = served_name(digest)
    seen = {}
    for url in urls:
        models = _listing(url)
        ident = _identity(url, name, "external", models)
        if ident is not None:
            return Served(url, name, {**ident, "checkpoint_digest": digest})
        seen[url] = [m.get("id") for m in models] if isinstance(models, list) else models
    raise ServerError(
        f"model.server.urls: no server serves checkpoint {uri} (served name {name!r}); they serve {seen}. "
        f"Start its server with --served-model-name {name}, or use model.server.mode=managed"
    )


# --- managed servers ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ServerSpec:
    """How to start a server (model.server): the interpreter of vLLM's environment and its flags."""

    python: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    start_timeout_s: float = 900.0
    max_servers: int = 2
    reload: bool = False
    lora_rank: int = 0  # lora mode: the servers' --max-lora-rank (0: no LoRA support)
    max_loras: int = 1


@dataclass
class Server:
    """One server process this process started."""

    proc: subprocess.Popen
    base_url: str
    name: str  # the served name it was started with
    loaded: str  # the digest of the weights it holds now
    log_path: Path
    adapters: dict[str, str] = field(default_factory=dict)  # lora mode: served name -> adapter folder it was loaded from
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Stop the process group (SIGTERM, then SIGKILL after 30 s) and drop its log."""
        self._stop()
        with contextlib.suppress(OSError):
            self.log_path.unlink()

    def _stop(self) -> None:
        """The whole process group (guard, server, the server's engine workers):
        SIGTERM, up to 30 s for it to empty, then SIGKILL."""
        group = self.proc.pid  # the guard leads a session of its own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while _group_alive(group) and time.monotonic() < deadline:
            self.proc.poll()  # reap the guard, or it stays a member as a zombie
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.proc.wait()

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


# What a tokenizer-only folder keeps of a checkpoint (no config.json: see tokenizer_dir).
_NOT_TOKENIZER = ("config.json", "generation_config.json", "model.safetensors.index.json")


def tokenizer_dir(local_dir: str, digest: str) -> str:
    """The checkpoint's tokenizer files alone, for the server's ``--tokenizer``.

    transformers' AutoTokenizer, which vLLM loads tokenizers with, replaces the
    saved tokenizer of some model types by that type's own class when it sees
    config.json (Qwen2: its own pre-tokenizer rules; docs/models.md, "The
    tokenizer reload gotcha"), so the server would split text differently from
    the checkpoint's tokenizer. Without config.json it loads the files as saved."""
    out = Path(tempfile.gettempdir()) / "ipr-tokenizers" / digest
    if not (out / "tokenizer_config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:8]}-", dir=out.parent))  # whole or absent: renamed into place
        for f in Path(local_dir).iterdir():
            if f.is_file() and f.suffix in (".json", ".jinja", ".txt", ".model") and f.name not in _NOT_TOKENIZER:
                shutil.copy2(f, tmp / f.name)
        with contextlib.suppress(OSError):  # another process made it first: theirs is the same files
            tmp.rename(out)
    return str(out)


def tied_embeddings(local_dir: str) -> bool:
    """Whether the checkpoint ties its output layer to its embeddings (config.json)."""
    try:
        return bool(json.loads((Path(local_dir) / "config.json").read_text()).get("tie_word_embeddings", False))
    except (OSError, ValueError):
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _start(spec: ServerSpec, local_dir: str, digest: str, name: str) -> Server:
    """Start a server on ``local_dir`` (weights of ``digest``) under ``name``; wait until it lists it."""
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    tok = [] if "--tokenizer" in spec.args else ["--tokenizer", tokenizer_dir(local_dir, digest)]
    lora = ["--enable-lora", "--max-lora-rank", str(spec.lora_rank), "--max-loras", str(spec.max_loras)] if spec.lora_rank else []
    cmd = [spec.python, *VLLM_SERVER, "--model", local_dir, *tok, "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port), *lora, *spec.args]
    guarded = [sys.executable, str(GUARD), str(os.getpid()), "--", *cmd]  # stopped with this process, however it ends
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **dict(spec.env)}
    if spec.reload:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # exposes /collective_rpc and /reset_prefix_cache
    if spec.lora_rank:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # exposes /v1/load_lora_adapter
    log_path = Path(tempfile.mkstemp(prefix=f"ipr-server-{digest[:8]}-", suffix=".log")[1])
    t0 = time.monotonic()
    try:
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(guarded, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    except OSError as e:
        raise ServerError(f"model.server.python={spec.python!r} cannot start a server: {e}") from e
    server = Server(proc, base_url, name, digest, log_path)
    log.info("starting a server for %s on %s (log: %s)", name, base_url, log_path)
    while _identity(base_url, name, "managed") is None:
        if not server.alive() or time.monotonic() - t0 > spec.start_timeout_s:
            why = f"exited with status {proc.returncode}" if not server.alive() else f"did not answer in {spec.start_timeout_s:.0f} s (model.server.start_timeout_s)"
            tail = server.tail()
            server.stop()
            rc = proc.returncode
            if rc is not None and (rc < 0 or rc > 128):  # killed by a signal (OOM killer, an operator): worth a retry
                raise PolicyError(f"the server for checkpoint {digest} was killed by signal {-rc if rc < 0 else rc - 128} while starting")
            raise ServerError(f"the server for checkpoint {digest} ({' '.join(cmd[:3])} ...) {why}; its last output:\n{tail}")
        time.sleep(1.0)
    log.info("server for %s up in %.1f s", name, time.monotonic() - t0)
    return server


def _post(server: Server, path: str, body: dict | None = None, timeout_s: float = 600.0) -> httpx.Response:
    root = server.base_url[: -len("/v1")]
    r = httpx.post(root + path, json=body, timeout=timeout_s)
    if r.status_code != 200:
        raise ServerError(f"{root}{path} answered HTTP {r.status_code}: {r.text[:300]}")
    return r


def reload_weights(server: Server, local_dir: str, digest: str) -> dict[str, Any]:
    """Swap ``server``'s weights for ``local_dir``'s and reset its prefix cache:
    without the reset, replies come from KV cached under the old weights."""
    t0 = time.monotonic()
    _post(server, "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": local_dir}})
    t1 = time.monotonic()
    _post(server, "/reset_prefix_cache")
    server.loaded = digest
    return {"reload_s": round(t1 - t0, 3), "reset_s": round(time.monotonic() - t1, 3), "prefix_cache_reset": True}


class ServerPool:
    """The servers this process started (one pool per ServerSpec; ``connect``)."""

    def __init__(self, spec: ServerSpec):
        self.spec = spec
        self.servers: list[Server] = []
        self.started = 0
        self.lock = threading.Lock()  # held while a server starts: stages wait for it rather than start a second
        atexit.register(self.stop_all)

    def acquire(self, local_dir: Callable[[], str], digest: str) -> tuple[Server, dict[str, Any]]:
        """A server holding ``digest``'s weights, and how it got them. ``local_dir``
        fetches the checkpoint (only when a server must load it; once)."""
        local_dir = functools.cache(local_dir)
        with self.lock:
            for s in [s for s in self.servers if not s.alive()]:
                log.warning("the server for %s died (status %s); starting it again", s.loaded, s.proc.returncode)
                self.servers.remove(s)
            for s in self.servers:
                if s.loaded == digest:
                    return self._use(s), {"how": "reused"}
            idle = sorted((s for s in self.servers if s.users == 0), key=lambda s: s.last_used)
            note: dict[str, Any] = {}
            if self.spec.reload and idle:
                local = local_dir()
                if not tied_embeddings(local):
                    return self._use(idle[0]), {"how": "reloaded", **reload_weights(idle[0], local, digest)}
                # vLLM's reload_weights leaves a tied output layer as it was: the server would mix two checkpoints
                log.warning("checkpoint %s ties its embeddings, which vLLM's weight reload does not update: starting a server for it instead", digest)
                note = {"reload_refused": "tied embeddings"}
            if len(self.servers) >= self.spec.max_servers and idle:
                idle[0].stop()
                self.servers.remove(idle[0])
            t0 = time.monotonic()
            # reload mode: a slot name, since the weights behind it change; managed: the checkpoint's own
            self.started += 1
            name = f"ipr-slot-{os.getpid()}-{self.started}" if self.spec.reload else served_name(digest)
            s = _start(self.spec, local_dir(), digest, name)
            self.servers.append(s)
            return self._use(s), {"how": "started", "start_s": round(time.monotonic() - t0, 3), **note}

    def load_adapter(self, s: Server, name: str, path: str) -> dict[str, Any]:
        """Have ``s`` serve the adapter at ``path`` as ``name`` (once per server process)."""
        with self.lock:
            if s.adapters.get(name) == path:
                return {"adapter": "reused"}
            t0 = time.monotonic()
            _post(s, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
            s.adapters[name] = path
            return {"adapter": "loaded", "adapter_load_s": round(time.monotonic() - t0, 3)}

    def _use(self, s: Server) -> Server:
        s.users += 1
        s.last_used = time.monotonic()
        return s

    def release(self, s: Server) -> None:
        with self.lock:
            s.users = max(0, s.users - 1)
            s.last_used = time.monotonic()

    def stop_all(self) -> None:
        for s in list(self.servers):
            s.stop()
        self.servers.clear()


def managed_identity(s: Server, digest: str, mode: str, how: dict[str, Any]) -> dict[str, Any]:
    """What the stage records: the server's own listing, and the weights it holds."""
    ident = _identity(s.base_url, s.name, mode)
    if ident is None:
        raise PolicyError(f"the managed server on {s.base_url} no longer lists {s.name!r}")  # transient: it died under us
    return {**ident, "checkpoint_digest": digest, "pid": s.proc.pid, **how}


# --- what a stage calls -----------------------------------------------------------------


def check_servers(model_cfg: Any) -> None:
    """Before any work: external servers answer /v1/models; a managed server's
    Python has vLLM. (What they serve is checked per stage: checkpoints do not exist yet.)"""
    from ipr_core.config import ConfigError

    sv = model_cfg.server
    if sv.mode == "external":
        for url in external_urls(model_cfg):
            try:
                listed_models(url, timeout_s=10.0)
            except (httpx.HTTPError, ValueError) as e:
                field_ = "model.server.urls" if sv.urls else "model.openai.base_url"
                raise ConfigError(f"{field_}: the server at {url} does not answer GET /models ({type(e).__name__}: {e})") from None
        return
    python = spec_of(sv).python
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        ok = subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if not ok:
        raise ConfigError(
            f"model.server.mode={sv.mode}: {python!r} cannot import vllm; set model.server.python (or IPR_VLLM_PYTHON) "
            "to the Python of vLLM's own environment (docs/models.md, \"Serving with vLLM\")"
        )


def spec_of(server_cfg: Any) -> ServerSpec:
    """The ServerSpec of ``model.server``."""
    python = server_cfg.python or os.environ.get("IPR_VLLM_PYTHON") or "python3"
    env = tuple(sorted(server_cfg.env.items()))
    lora = server_cfg.max_lora_rank if server_cfg.mode == "lora" else 0
    return ServerSpec(python, tuple(server_cfg.args), env, server_cfg.start_timeout_s, server_cfg.max_servers, server_cfg.mode == "reload", lora, server_cfg.max_loras)


def connect(model_cfg: Any, uri: str) -> tuple[Served, Callable[[], None]]:
    """The server that generates for the checkpoint at ``uri`` (checked), and
    the call that releases it when the stage is done with it."""
    from ipr_core import store
    from ipr_core.resources import process_wide

    sv, digest = model_cfg.server, store.digest(uri)
    if sv.mode == "external":
        return check_external(external_urls(model_cfg), digest, uri), lambda: None
    spec = spec_of(sv)
    pool = process_wide(("model-servers", spec), lambda: ServerPool(spec))
    local = store.read_checkpoint(uri) if sv.mode == "lora" else None  # lora: the adapter, if any, is in the checkpoint
    base = adapter_base(uri, local) if local is not None else None
    weights = base or Base(uri, digest)  # what the server must hold: the adapter's base, else the checkpoint
    server, how = pool.acquire(lambda: str(store.read_checkpoint(weights.uri)), weights.digest)
    try:
        if base is None:
            ident = managed_identity(server, digest, sv.mode, how)
        else:
            ident = adapter_identity(pool, server, str(adapter_dir(local)), digest, how)
    except BaseException:
        pool.release(server)
        raise
    return Served(server.base_url, ident["served_model"], ident), lambda: pool.release(server)


def adapter_base(uri: str, local: Path) -> Base | None:
    """The base of the LoRA adapter of the checkpoint at ``uri`` (``local``: its folder),
    checked: it exists with the digest the adapter recorded; None when it has no adapter."""
    from ipr_core import store

    base = read_base(local)
    if base is None:
        return None
    try:
        found = store.digest(base.uri)
    except store.ArtifactNotFound:
        found = None
    if found != base.digest:
        raise ServerError(f"checkpoint {uri}: the base its LoRA adapter applies to, {base.uri}, " + (f"now holds {found}, not {base.digest}" if found else "is gone"))
    return base


def adapter_identity(pool: ServerPool, server: Server, path: str, digest: str, how: dict[str, Any]) -> dict[str, Any]:
    """Load checkpoint ``digest``'s adapter (folder ``path``) on ``server`` (its base's)
    under the checkpoint's served name, and check the server lists it, from that folder, on that base."""
    name = served_name(digest)
    loaded = pool.load_adapter(server, name, path)
    ident = _identity(server.base_url, name, "lora")
    if ident is None:
        raise PolicyError(f"the server on {server.base_url} does not list the adapter {name!r} it loaded")  # transient: restarted under us
    if ident.get("root") != path or ident.get("parent") not in (None, server.name):
        raise ServerError(f"the server on {server.base_url} lists {name!r} from {ident.get('root')} on {ident.get('parent')}, not from {path} on {server.name}")
    return {**ident, "checkpoint_digest": digest, "base_model": server.name, "base_digest": server.loaded, "pid": server.proc.pid, **how, **loaded}
