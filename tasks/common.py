"""What every stage task shares: cache policy, retries, result storage.

Facts that shaped this (DESIGN.md):
- Prefect's default cache policy includes the run id, so nothing is reused
  across runs: ours is INPUTS + TASK_SOURCE + a code-version term (TASK_SOURCE
  hashes only the task's own body; ipr_core's code changes must count too).
  The output URI is an input, so the artifact root is part of the key.
- Results are tiny JSON (URIs), never pickles in shared storage.
- Result storage: a local path by default; for ``s3://`` roots a *saved*
  RemoteFileSystem block (a bare s3:// string is taken as a block slug).
- A cache record whose artifact was deleted or never completed must not be
  trusted: the flow refreshes the cache for such a stage (``submit_stage``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from pathlib import Path
from typing import Any, Callable

from prefect import Task, task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from ipr_core import code_version, store
from ipr_core.config import IPRConfig, config_from_json
from ipr_core.envs.base import EnvError
from ipr_core.policies.base import PolicyError

log = logging.getLogger(__name__)


class CodeVersion(CachePolicy):
    """Cache key term: ipr_core's version + source digest."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        return code_version()


class InputDigests(CachePolicy):
    """Cache key term: the content digest of every input artifact.

    Inputs are URIs, and a URI can hold new content (an upstream stage that was
    recomputed differently): keying on the digests makes downstream stages
    recompute exactly when what they read changed.
    """

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        parts = []
        for name in sorted(inputs):
            if name == "out" or not (name.endswith("_uri") or name.endswith("_uris")):
                continue
            value = inputs[name]
            for uri in value if isinstance(value, (list, tuple)) else [value]:
                m = store.read_manifest(uri)
                parts.append(f"{uri}={m.digest if m else 'absent'}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()


STAGE_CACHE = INPUTS + TASK_SOURCE + CodeVersion() + InputDigests()

# Transient: worth a retry. Everything else (bad config, schema errors,
# algorithmic bugs) fails fast.
TRANSIENT: tuple[type[BaseException], ...] = (EnvError, PolicyError, ConnectionError, TimeoutError, OSError)
NOT_TRANSIENT: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, store.StoreError)


def is_transient(exc: BaseException | None) -> bool:
    if getattr(exc, "retryable", True) is False:  # e.g. an HTTP 401/400 from a model server
        return False
    return isinstance(exc, TRANSIENT) and not isinstance(exc, NOT_TRANSIENT)


def retry_if_transient(task_: Task, task_run, state) -> bool:
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as e:  # noqa: BLE001 - we only classify it
            exc = e
    retry = is_transient(exc)
    if not retry:
        log.info("%s failed with a non-transient %s: not retrying", task_.name, type(exc).__name__)
    return retry


def _input_uris(params: dict) -> list[str]:
    uris: list[str] = []
    for name, value in params.items():
        if name != "out" and (name.endswith("_uri") or name.endswith("_uris")):
            uris += list(value) if isinstance(value, (list, tuple)) else [value]
    return uris


def up_to_date(out: str, cfg: dict, params: dict) -> bool:
    """True when ``out`` holds a complete artifact made by this code, from this
    stage config and from inputs with the same content digests as now.

    A run killed after a stage wrote its manifest but before Prefect committed
    the task's cache record must not redo that stage: the manifest is the
    source of truth, the cache record only a shortcut.
    """
    m = store.read_manifest(out)
    if m is None or not store.exists(out):
        return False
    if m.code_version != code_version() or m.config_digest != as_config(cfg).digest():
        return False
    try:
        current = {u: store.digest(u) for u in _input_uris(params)}
    except store.ArtifactNotFound:
        return False
    return dict(m.inputs) == current


def _reuse_finished(fn: Callable[..., str]) -> Callable[..., str]:
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        params = dict(sig.bind(*args, **kwargs).arguments)
        cfg, out = params.pop("cfg"), params.pop("out")
        if isinstance(out, str) and up_to_date(out, cfg, params):
            log.info("%s: %s is complete and up to date: reusing it", fn.__name__, out)
            return out
        return fn(*args, **kwargs)

    return wrapper


def stage_task(name: str) -> Callable[[Callable[..., Any]], Task]:
    """Decorator for stage tasks: cross-run cache, JSON results, transient-only
    retries, and reuse of an output artifact that is already up to date."""
    deco = task(
        name=name,
        cache_policy=STAGE_CACHE,
        persist_result=True,
        result_serializer="json",
        retries=2,
        retry_delay_seconds=[2, 4, 8],
        retry_condition_fn=retry_if_transient,
    )
    return lambda fn: deco(_reuse_finished(fn))


# --- per-run configuration of the tasks -------------------------------------------------


def stage_cfg(cfg: IPRConfig, *paths: str) -> dict:
    """The config a stage depends on: run name, seed and the given dotted sections,
    defaults elsewhere. Passed as the task's input, so an unrelated change (say,
    the IPR learning rate) does not invalidate the expert collection's cache."""
    full = cfg.model_dump(mode="json")
    out = IPRConfig().model_dump(mode="json")
    out["run_name"], out["seed"], out["storage"] = full["run_name"], full["seed"], full["storage"]
    for path in paths:
        src, dst = full, out
        parts = path.split(".")
        for p in parts[:-1]:
            src, dst = src[p], dst[p]
        dst[parts[-1]] = src[parts[-1]]
    return out


def as_config(data: dict) -> IPRConfig:
    return config_from_json(data)


def result_storage(cfg: IPRConfig):
    """Where Prefect keeps cache records: next to the artifacts."""
    root = store.normalize_uri(cfg.storage.root)
    if "://" not in root:
        path = Path(root) / "_prefect_results"
        path.mkdir(parents=True, exist_ok=True)
        return path
    from prefect.filesystems import RemoteFileSystem

    name = "ipr-results-" + hashlib.sha256(root.encode()).hexdigest()[:12]
    block = RemoteFileSystem(basepath=store.join(root, "_prefect_results"))
    block.save(name, overwrite=True)
    return RemoteFileSystem.load(name)


def configure(t: Task, cfg: IPRConfig, storage) -> Task:
    delay = cfg.pipeline.retry_delay_s
    return t.with_options(
        retries=cfg.pipeline.retries,
        retry_delay_seconds=[delay * 2**i for i in range(max(cfg.pipeline.retries, 1))],
        result_storage=storage,
    )
