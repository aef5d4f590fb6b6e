"""Run a declared stage: reuse what is up to date, copy what another run of the
same root already computed, compute the rest, and write it (manifest last).

This is the only layer that writes datasets and checkpoints (an architecture
test checks it): a stage body returns data, ``write_output`` stores it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel

from ipr_core import store
from ipr_core.resources import PeakRSS, set_torch_threads, stage_threads, thread_settings
from ipr_core.pipeline.placement import external_cluster
from ipr_core.pipeline.stage import Context, Folder, Output, Rows, Stage, identity, recipe
from ipr_core.schemas import from_rows

log = logging.getLogger(__name__)

INDEX = "_index"  # {root}/_index/{stage}/{identity}.json -> where that result lives


def flat_uris(inputs: Mapping[str, str | Sequence[str]]) -> list[str]:
    return [u for v in inputs.values() for u in ([v] if isinstance(v, str) else v)]


def input_digests(inputs: Mapping[str, str | Sequence[str]], missing: str | None = None) -> dict[str, list[str]]:
    """Each input's content digest(s). An incomplete input raises ArtifactNotFound,
    or, given ``missing``, stands as that string (cache keys, ``ipr explain``)."""

    def one(uri: str) -> str:
        if missing is None:
            return store.digest(uri)
        m = store.read_manifest(uri)
        return m.digest if m is not None else missing

    return {k: [one(u) for u in ([v] if isinstance(v, str) else v)] for k, v in inputs.items()}


@dataclass(frozen=True)
class Call:
    """One invocation of a stage: where its artifact goes and what it reads."""

    stage: Stage
    out: str
    params: Mapping[str, Any]
    inputs: Mapping[str, str | Sequence[str]]

    def recipe(self, cfg: BaseModel, digests: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
        return recipe(self.stage, cfg, self.params, digests if digests is not None else input_digests(self.inputs))


def index_uri(root: str, st: Stage, ident: str) -> str:
    return store.join(root, INDEX, st.name, f"{ident}.json")


def is_fresh(out: str, ident: str) -> bool:
    """``out`` holds this identity's result and every file matches its manifest."""
    try:
        m = store.read_manifest(out)
    except store.StoreError:
        return False
    if m is None or m.identity != ident:
        return False
    if not store.intact(out):
        log.warning("%s is damaged (%s): recomputing it", out, "; ".join(store.problems(out)))
        return False
    return True


def _indexed(root: str, st: Stage, ident: str, out: str) -> str | None:
    """Another location under ``root`` that holds this exact result, if any."""
    try:
        src = json.loads(store.read_bytes(index_uri(root, st, ident)))["uri"]
    except (store.ArtifactNotFound, ValueError, KeyError):
        return None
    return src if src != out and is_fresh(src, ident) else None


def write_output(
    out: str, kind: str, output: Output, *, inputs: Sequence[str] = (), stamp: store.Stamp | None = None, wall_s: float = 0.0, used: Mapping[str, Any] | None = None
) -> store.Manifest:
    """Write a stage body's output at ``out`` (parts first, manifest last);
    ``used``: what computing it used (peak memory, threads), kept with its timings."""
    timings = {"wall_s": round(wall_s, 3), **(used or {})}
    if isinstance(output, Folder):
        if kind != "checkpoint":
            raise TypeError(f"{out}: a model folder was returned for a {kind!r} output")
        return store.write_checkpoint(out, output.path, inputs=inputs, meta=output.meta, timings=timings, stamp=stamp)
    return store.write_dataset(out, from_rows(list(output.rows), kind), kind, inputs=inputs, meta=output.meta, timings=timings, stamp=stamp)


def execute(call: Call, cfg: BaseModel, root: str) -> str:
    """Make ``call.out`` hold the stage's result for ``cfg``; returns its URI."""
    st, out = call.stage, call.out
    rec = call.recipe(cfg)
    ident = identity(rec)
    if is_fresh(out, ident):
        log.info("%s: %s is up to date: reusing it", st.name, out)
        return out
    src = _indexed(root, st, ident, out)
    if src is not None:
        log.info("%s: same inputs and settings as %s: copying it", st.name, src)
        store.copy_artifact(src, out, inputs=flat_uris(call.inputs), stamp=store.Stamp(ident, rec, f"copied from {src}"))
        return out
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix=f"ipr-{st.name}-") as tmp:
        ctx = Context(st.view(cfg), Path(tmp), st.out_path(call.params), root)
        # here: in whichever process (Dask, Ray worker) the stage runs
        p = cfg.pipeline
        # Ray (local or not) gives a task the CPUs it asked for (OMP_NUM_THREADS): its tasks run side by side
        # up to the CPUs, not up to max_workers
        on_own_cores = external_cluster(cfg) is None and p.task_runner != "ray"
        set_torch_threads(stage_threads(p.torch_threads, max_workers=p.max_workers, local=on_own_cores))
        with PeakRSS() as peak:
            output = st.fn(ctx, **call.inputs, **call.params)
        used = {"peak_rss_mb": peak.peak_mb, **thread_settings()}
        write_output(out, st.kind, output, inputs=flat_uris(call.inputs), stamp=store.Stamp(ident, rec), wall_s=time.time() - t0, used=used)
    store.write_bytes(index_uri(root, st, ident), json.dumps({"uri": out}).encode())
    return out


def publish(out: str, kind: str, output: Output, *, meta: Mapping[str, Any] | None = None, wall_s: float = 0.0) -> store.Manifest:
    """Write a standalone artifact (``ipr data``, ``ipr model``): no stage identity."""
    if meta:
        output = Folder(output.path, {**output.meta, **meta}) if isinstance(output, Folder) else Rows(output.rows, {**output.meta, **meta})
    return write_output(out, kind, output, wall_s=wall_s)
