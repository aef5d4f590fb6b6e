"""What every stage task shares: cache key, retries, result storage, run names.

Facts that shaped this (docs/prefect.md, docs/run-layout.md):
- Prefect's default cache policy includes the run id, so nothing would be
  reused across flow runs: ours is the stage's identity (declared config
  reads, parameters, input content digests, code version; ipr_core.pipeline)
  plus the output location, since the cached result *is* that location. The
  run name and storage root are not in the identity: the runner copies a
  result another run under the same root already computed (``_index``).
- Results are tiny JSON (URIs), never pickles in shared storage.
- Result storage: a local path by default; for ``s3://`` roots a *saved*
  RemoteFileSystem block (a bare s3:// string is taken as a block slug).
- A cache record whose artifact was deleted or never completed must not be
  trusted: the flow refreshes the cache for such a stage (``Stages.submit``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import Task, task
from prefect.cache_policies import CachePolicy
from prefect.runtime import task_run

from ipr_core import store
from ipr_core.config import IPRConfig, config_from_json
from ipr_core.envs.base import EnvError
from ipr_core.pipeline import Call, Stage, client_options, execute
from ipr_core.pipeline.runner import input_digests
from ipr_core.pipeline.stage import identity
from ipr_core.policies.base import PolicyError

log = logging.getLogger(__name__)


@dataclass
class StageKey(CachePolicy):
    """Cache key: the stage's identity + its output location."""

    stage: Stage | None = None

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str:
        call = Call(self.stage, inputs["out"], inputs["params"], inputs["inputs"])
        ident = identity(call.recipe(config_from_json(inputs["cfg"]), input_digests(inputs["inputs"], missing="absent")))
        return hashlib.sha256(f"{ident}\n{call.out}".encode()).hexdigest()


# Transient: worth a retry. Everything else (bad config, schema errors,
# algorithmic bugs) fails fast.
TRANSIENT: tuple[type[BaseException], ...] = (EnvError, PolicyError, ConnectionError, TimeoutError, OSError)
NOT_TRANSIENT: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, store.StoreError)


def is_transient(exc: BaseException | None) -> bool:
    if getattr(exc, "retryable", True) is False:  # e.g. an HTTP 401/400 from a model server
        return False
    return isinstance(exc, TRANSIENT) and not isinstance(exc, NOT_TRANSIENT)


def retry_if_transient(task_: Task, task_run_, state) -> bool:
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


def _task_run_name(stage: Stage):
    """``explore[iter-01/explore/shard-000]``: the stage and its place in the run."""

    def name() -> str:
        params = task_run.parameters or {}
        return f"{stage.name}[{stage.out_path(params.get('params') or {})}]"

    return name


def stage_task(st: Stage) -> Task:
    """The Prefect task of a declared stage: thin (config + URIs in, URI out),
    cached by identity, JSON results, retried on transient errors only."""

    def run(cfg: dict, out: str, inputs: dict[str, Any], params: dict[str, Any]) -> str:
        c = config_from_json(cfg)
        with store.client_options(client_options(c)):
            return execute(Call(st, out, params, inputs), c, store.normalize_uri(c.storage.root))

    run.__name__ = run.__qualname__ = st.fn.__name__
    run.__doc__ = st.doc
    return task(
        name=st.name,
        task_run_name=_task_run_name(st),
        description=st.doc,
        cache_policy=StageKey(stage=st),
        persist_result=True,
        result_serializer="json",
        retries=2,
        retry_delay_seconds=[2, 4, 8],
        retry_condition_fn=retry_if_transient,
    )(run)


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
