"""The task runner a run asks for, and what a Ray or Dask cluster needs before
the first stage goes to it.

- ``task_runner(cfg)``: threads (default), Dask (a LocalCluster, or the
  scheduler at ``pipeline.dask_address``) or Ray (a local instance, or the
  cluster at ``pipeline.ray_address``).
- Ray workers get the Prefect API this process talks to (and the variables
  named in ``pipeline.worker_env``) through Ray's runtime_env, so their task
  runs land in the same flow run; Dask workers keep the environment they were
  started with, so ``Placement.of`` checks that they talk to the same API.
- ``Placement``: every stage group's request (ipr_core.pipeline.placement),
  resolved against the cluster's nodes and checked before anything is
  submitted; ``Placement.place(needs)`` wraps a submission in Ray's
  ``remote_options`` or Dask's resource annotation.

A worker lost mid-stage is the engine's to survive: Ray re-executes a task
whose worker died (``max_retries``, 3 by default) and Dask reschedules a task
whose worker left (``distributed.scheduler.allowed-failures``, 3); the task run
keeps its id, a stage writes its manifest last, and a shard recomputed from
the same seeds is the same shard (tests/test_clusters.py).
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from ipr_core.config import ConfigError, IPRConfig
from ipr_core.pipeline.placement import Node, Request, check_feasible, external_cluster

# Prefect settings a worker needs to report to the same API (and log ipr_core's lines there).
PREFECT_VARS = ("PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_LOGGING_EXTRA_LOGGERS", "PREFECT_API_SSL_CERT_FILE")


def api_url() -> str | None:
    """The Prefect API this process reports to: PREFECT_API_URL, or the local
    ephemeral server a run without one started."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        url = str(client.api_url or "")
    return url.rstrip("/") or None


def worker_env(patterns: tuple[str, ...] | list[str]) -> dict[str, str]:
    """What Ray workers must share with this process: the Prefect API (URL, key,
    extra loggers) and this process's variables matching ``patterns``."""
    env = {k: v for k, v in os.environ.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
    env.update({k: os.environ[k] for k in PREFECT_VARS if k in os.environ})
    url = api_url()
    if url:
        env["PREFECT_API_URL"] = url
    return env


def _ray_runner_class():
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:
        raise ImportError("pipeline.task_runner=ray needs prefect-ray: pip install 'ipr-flow[ray]'") from e

    class ClusterRayTaskRunner(RayTaskRunner):
        """RayTaskRunner whose workers get ``worker_env`` as it is when the flow starts
        (the API URL of an ephemeral server is known only then)."""

        def __init__(self, address: str | None = None, init_kwargs: dict | None = None, forward: tuple[str, ...] = ()):
            super().__init__(address=address, init_kwargs=init_kwargs)
            self.forward = tuple(forward)

        def duplicate(self):
            return type(self)(self.address, self.init_kwargs, self.forward)

        def __eq__(self, other: object) -> bool:
            return super().__eq__(other) and getattr(other, "forward", None) == self.forward

        def __enter__(self):
            rt = dict(self.init_kwargs.get("runtime_env") or {})
            rt["env_vars"] = {**worker_env(self.forward), **(rt.get("env_vars") or {})}
            self.init_kwargs = {**self.init_kwargs, "runtime_env": rt}
            return super().__enter__()

    return ClusterRayTaskRunner


def _dask_runner_class():
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as e:
        raise ImportError("pipeline.task_runner=dask needs prefect-dask: pip install 'ipr-flow[dask]'") from e

    class LocalEnvDaskTaskRunner(DaskTaskRunner):
        """DaskTaskRunner whose LocalCluster workers get this flow's Prefect API (an
        ephemeral server's URL is known only when the flow starts): without it each
        worker process starts an API of its own on the same database. An external
        scheduler's workers keep their own environment (checked by Placement.of)."""

        def __enter__(self):
            if not self.address:
                env = {**worker_env(()), **(self.cluster_kwargs.get("env") or {})}
                self.cluster_kwargs = {**self.cluster_kwargs, "env": env}
            return super().__enter__()

    return LocalEnvDaskTaskRunner


def task_runner(cfg: IPRConfig):
    """The task runner from config: threads (default), Dask or Ray."""
    p = cfg.pipeline
    if p.task_runner == "threads":
        # Not Prefect's plain ThreadPoolTaskRunner: its idle worker threads keep
        # torch's OpenMP teams alive, which slows every stage (flows/task_runners.py;
        # measured by bench/orchestration.py, figures in docs/performance.md).
        from flows.task_runners import StageTaskRunner

        return StageTaskRunner(max_workers=p.max_workers)
    if p.task_runner == "dask":
        runner = _dask_runner_class()
        if p.dask_address:
            return runner(address=p.dask_address)
        return runner(cluster_kwargs={"n_workers": p.max_workers, "threads_per_worker": 1, "processes": True})
    # A local instance: no dashboard (nobody opens it, and it costs a process and memory).
    init = {} if p.ray_address else {"include_dashboard": False}
    return _ray_runner_class()(address=p.ray_address, init_kwargs=init, forward=tuple(p.worker_env))


# --- what the cluster has, and what each stage asks of it -------------------------------


def _ray_nodes() -> list[Node]:
    import ray

    return [Node(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0))) for n in ray.nodes() if n.get("Alive")]


def _dask_workers(client) -> tuple[list[Node], set[str]]:
    """The workers as nodes, and the resource names every worker advertises."""
    workers = list(client.scheduler_info(n_workers=-1)["workers"].values())
    nodes = [Node(float(w.get("resources", {}).get("CPU", w["nthreads"])), float(w.get("resources", {}).get("GPU", 0))) for w in workers]
    names = set.intersection(*(set(w.get("resources", {})) for w in workers)) if workers else set()
    return nodes, names


def _worker_api_url() -> str:
    from prefect.settings import get_current_settings

    return str(get_current_settings().api.url or "").rstrip("/")


def _check_dask_api(client, address: str) -> None:
    """Dask workers report task runs to the API they were started with: it must be ours."""
    ours = api_url() or ""
    theirs = client.run(_worker_api_url)
    wrong = {w: u for w, u in theirs.items() if u != ours}
    if wrong:
        w, u = next(iter(wrong.items()))
        raise ConfigError(
            f"pipeline.dask_address={address!r}: worker {w} reports to the Prefect API {u or '(none: an ephemeral one of its own)'!s}, this run to {ours or '(ephemeral)'}; "
            f"start the workers with PREFECT_API_URL={ours or '<a Prefect server URL>'} (an ephemeral API cannot be shared: run `prefect server start`)"
        )


@dataclass(frozen=True)
class Placement:
    """Resolved requests per stage group for the runner in use (empty for threads)."""

    engine: str = "threads"
    requests: dict[str, Request] = field(default_factory=dict)
    dask_resources: frozenset[str] = frozenset()  # resource names a Dask submission may ask for

    @classmethod
    def of(cls, cfg: IPRConfig, runner: Any) -> "Placement":
        """Check the cluster behind ``runner`` against the config; ConfigError before any submission."""
        engine = cfg.pipeline.task_runner
        if engine == "ray":
            return cls("ray", check_feasible(cfg, _ray_nodes(), "Ray"))
        if engine == "dask":
            client = runner.client  # connects on first use
            nodes, names = _dask_workers(client)
            if external_cluster(cfg) is not None:
                _check_dask_api(client, cfg.pipeline.dask_address)
            return cls("dask", check_feasible(cfg, nodes, "Dask"), frozenset(names) | {"GPU"})
        return cls()

    @contextlib.contextmanager
    def place(self, needs: str) -> Iterator[None]:
        """Submissions inside ask the cluster for group ``needs``'s request."""
        req = self.requests.get(needs)
        if req is None:
            yield
            return
        if self.engine == "ray":
            from prefect_ray.context import remote_options

            with remote_options(num_cpus=req.cpus, num_gpus=req.gpus):
                yield
            return
        import dask

        # Dask slots tasks by worker threads; a resource is asked for only if workers declare it
        # (a GPU always: a GPU stage must never land on a worker without one).
        asked = {k: v for k, v in (("CPU", req.cpus), ("GPU", req.gpus)) if v > 0 and k in self.dask_resources}
        with dask.annotate(resources=asked) if asked else contextlib.nullcontext():
            yield
