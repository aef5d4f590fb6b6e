"""The per-model result rows (one per evaluated model), built from manifests
alone, so the flow and ``ipr report`` show the same table."""

from __future__ import annotations

from typing import Any, Sequence

from ipr_core import store
from ipr_core.pipeline.dag import Node

COLUMNS = ("model", "success_rate", "mean_reward", "outcome_pairs", "step_pairs", "train_loss", "train_steps", "agent_step_reward_mean", "explore_mc_s", "pairs_s", "train_s", "eval_s", "note")
# Which stages' wall time each time column sums.
TIMES = {"explore_mc_s": ("explore", "agent-mc", "agent-rewards"), "pairs_s": ("pairs",), "train_s": ("train",), "eval_s": ("evaluate",)}


def _manifests(run: str, nodes: Sequence[Node | None]) -> dict[str, store.Manifest | None]:
    """Each node's manifest, read once."""
    return {n.key: store.read_manifest(store.join(run, n.key)) for n in nodes if n is not None}


def _meta(ms: dict, n: Node | None, key: str) -> Any:
    m = ms.get(n.key) if n is not None else None
    return m.meta.get(key) if m is not None else None


def _wall(ms: dict, nodes: Sequence[Node]) -> float | None:
    found = [ms[n.key] for n in nodes]
    return round(sum(m.timings.get("wall_s", 0.0) for m in found), 1) if found and all(found) else None


def _training(ms: dict, n: Node | None) -> dict[str, Any]:
    """Steps run / planned of the training stage that made the model, and a note if its time cap cut it."""
    m = ms.get(n.key) if n is not None else None
    if m is None or "steps" not in m.meta:
        return {}
    steps, planned = m.meta["steps"], m.meta.get("planned_steps", m.meta["steps"])
    cut = m.meta.get("cut_by_time", False)
    return {"train_steps": f"{steps}/{planned}", "note": f"{n.stage} cut by its time cap at {steps}/{planned} steps" if cut else None}


def model_row(run: str, ev: Node, nodes: Sequence[Node]) -> dict[str, Any]:
    """The row of the model that ``ev`` (an evaluate node) evaluated; every row has every column."""
    k = ev.iteration
    trainer = next((n for n in nodes if n.key == dict(ev.inputs)["model_uri"] and n.stage in ("sft", "train")), None)
    it = [n for n in nodes if n.iteration == k] if k is not None and k >= 1 else []
    ms = _manifests(run, [ev, trainer, *it])
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(model=dict(ev.params)["tag"], success_rate=_meta(ms, ev, "success_rate"), mean_reward=_meta(ms, ev, "mean_reward"))
    row.update(_training(ms, trainer))
    if it:
        by = {n.stage: n for n in it}
        row.update(outcome_pairs=_meta(ms, by.get("pairs"), "outcome"), step_pairs=_meta(ms, by.get("pairs"), "step"))
        row.update(train_loss=_meta(ms, by.get("train"), "final_loss"), agent_step_reward_mean=_meta(ms, by.get("agent-rewards"), "mean"))
        row.update({col: _wall(ms, [n for n in it if n.stage in stages]) for col, stages in TIMES.items()})
    return row


def result_rows(run: str, nodes: Sequence[Node]) -> list[dict[str, Any]]:
    """One row per evaluated model (base, sft, iter-01, ...), in DAG order; unevaluated models are left out."""
    return [model_row(run, n, nodes) for n in nodes if n.stage == "evaluate" and store.exists(store.join(run, n.key))]
