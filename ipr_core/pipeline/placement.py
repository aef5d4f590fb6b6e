"""Where stages run once work leaves the process: what each stage asks a Ray
or Dask cluster for, whether the cluster can give it, and whether the storage
root is one that the cluster's workers share.

Each stage declares a group (``@stage(..., needs=...)``); ``pipeline.resources``
holds one request per group, and ``"auto"`` resolves against the nodes of the
cluster the run connected to, so a default config asks a GPU cluster for GPUs
and a CPU cluster for CPUs. All of it is checked before the first stage is
submitted: a request no node can meet would wait forever in Ray's or Dask's
queue instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ipr_core import store
from ipr_core.config import ConfigError
from ipr_core.pipeline.stage import NEEDS

# Roots no other machine can reach: a path, or a filesystem inside this process.
LOCAL_SCHEMES = ("file", "memory", "local")


@dataclass(frozen=True)
class Node:
    """One machine of the cluster, as its engine reports it."""

    cpus: float
    gpus: float = 0.0


@dataclass(frozen=True)
class Request:
    """What one stage task asks for."""

    cpus: float
    gpus: float = 0.0

    def __str__(self) -> str:
        return f"{self.cpus:g} CPU" + (f", {self.gpus:g} GPU" if self.gpus else "")


def external_cluster(cfg: Any) -> tuple[str, str] | None:
    """(field, address) of the external cluster the run sends stages to, or None
    when they stay on this machine (threads, a LocalCluster, a local Ray)."""
    p = cfg.pipeline
    if p.task_runner == "ray" and p.ray_address:
        return "pipeline.ray_address", p.ray_address
    if p.task_runner == "dask" and p.dask_address:
        return "pipeline.dask_address", p.dask_address
    return None


def check_shared_storage(cfg: Any) -> None:
    """A ConfigError, before anything runs, when stages go to other machines but
    the storage root is a path on this one: their artifacts, cache records and
    checkpoints would land where the next stage cannot read them."""
    cluster = external_cluster(cfg)
    if cluster is None or cfg.storage.shared_local_root:
        return
    root = store.normalize_uri(cfg.storage.root)
    scheme = root.partition("://")[0] if "://" in root else "file"
    if scheme not in LOCAL_SCHEMES:
        return
    field, address = cluster
    raise ConfigError(
        f"storage.root={cfg.storage.root!r} is local to this machine, but {field}={address!r} runs stages on the cluster's workers, "
        "which cannot read or write it: use a root every worker reaches (s3://bucket/prefix or another shared fsspec URL), "
        "or set storage.shared_local_root=true if every worker mounts this path"
    )


def uses_gpus(cfg: Any, nodes: Sequence[Node]) -> bool:
    """Whether the in-process model runs on GPUs: model.device=cuda, or auto on a cluster that has them."""
    return cfg.model.device == "cuda" or (cfg.model.device == "auto" and any(n.gpus > 0 for n in nodes))


def _auto(cfg: Any, needs: str, nodes: Sequence[Node]) -> Request:
    gpu = uses_gpus(cfg, nodes)
    largest = max((n.cpus for n in nodes), default=1.0)
    if needs == "generation":
        # external servers do the generating: the stage itself needs no GPU; a managed one runs beside the stage
        local_model = cfg.model.backend != "openai" or cfg.model.server.mode != "external"
        return Request(1.0, float(cfg.model.replicas) if gpu and local_model else 0.0)
    if needs == "environment":
        return Request(float(min(cfg.env.workers, largest)))
    if needs == "training":
        # one GPU per training process, all on one node (torchrun runs them where the stage runs)
        return Request(1.0, float(cfg.training.processes)) if gpu else Request(largest)
    return Request(1.0)


def request(cfg: Any, needs: str, nodes: Sequence[Node] = ()) -> Request:
    """The request of a stage of group ``needs``: ``pipeline.resources.<needs>``
    with each "auto" resolved against ``nodes``."""
    if needs not in NEEDS:
        raise ValueError(f"unknown stage group {needs!r} (one of {NEEDS})")
    want, auto = getattr(cfg.pipeline.resources, needs), _auto(cfg, needs, nodes)
    return Request(
        auto.cpus if want.cpus == "auto" else float(want.cpus),
        auto.gpus if want.gpus == "auto" else float(want.gpus),
    )


def requests(cfg: Any, nodes: Sequence[Node]) -> dict[str, Request]:
    """Every group's request against ``nodes``."""
    return {g: request(cfg, g, nodes) for g in NEEDS}


def check_feasible(cfg: Any, nodes: Sequence[Node], engine: str) -> dict[str, Request]:
    """Every group's request, or a ConfigError naming the first one that no node
    of the cluster can meet (it would wait in the engine's queue forever)."""
    if not nodes:
        raise ConfigError(f"the {engine} cluster has no live worker node")
    out = requests(cfg, nodes)
    for group, req in out.items():
        if not any(n.cpus >= req.cpus and n.gpus >= req.gpus for n in nodes):
            have = ", ".join(str(Request(n.cpus, n.gpus)) for n in nodes)
            raise ConfigError(f"pipeline.resources.{group} asks each stage for {req}, but no {engine} node has that much (nodes: {have})")
    return out
