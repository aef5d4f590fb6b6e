"""The per-model result rows (one per evaluated model), built from manifests
alone, so the flow and ``ipr report`` show the same table."""

from __future__ import annotations

from typing import Any, Sequence

from ipr_core import store
from ipr_core.pipeline.dag import Node, agent_rewards_node
from ipr_core.pipeline.stages import STAGES

COLUMNS = ("model", "success_rate", "mean_reward", "val_success_rate", "val_mean_reward", "outcome_pairs", "step_pairs", "train_loss", "train_steps", "agent_mc_targets", "agent_mc_rollouts", "agent_mc_reused", "agent_mc_skipped", "agent_mc_tokens", "expert_mc_targets", "expert_mc_rollouts", "expert_mc_reused", "expert_mc_tokens", "rm_scored", "rm_rollouts_avoided", "rm_held_out_mae", "rm_pair_agreement", "agent_step_reward_mean", "agent_mc_s", "expert_mc_s", "explore_mc_s", "pairs_s", "train_s", "eval_s", "peak_rss_mb", "note")
MC_COLUMNS = {"agent_mc_targets": "estimates", "agent_mc_rollouts": "rollouts", "agent_mc_reused": "rollouts_reused", "agent_mc_skipped": "skipped_rollouts", "agent_mc_tokens": "generated_tokens"}
# mc.expert_steps=paired: the iteration's expert MC (the expert steps its pairs compare)
EXPERT_MC_COLUMNS = {"expert_mc_targets": "estimates", "expert_mc_rollouts": "rollouts", "expert_mc_reused": "rollouts_reused", "expert_mc_tokens": "generated_tokens"}
# Which stages' wall time each time column sums.
TIMES = {"agent_mc_s": ("agent-mc", "hybrid-mc"), "expert_mc_s": ("expert-mc-paired",), "explore_mc_s": ("explore", "agent-mc", "agent-rewards", "expert-mc-paired", "expert-rewards-paired", "agent-rm-rewards", "reward-model", "hybrid-mc", "hybrid-rewards"), "pairs_s": ("pairs",), "train_s": ("train",), "eval_s": ("evaluate",)}


def _manifests(run: str, nodes: Sequence[Node | None]) -> dict[str, store.Manifest | None]:
    """Each node's manifest, read once."""
    return {n.key: store.read_manifest(store.join(run, n.key)) for n in nodes if n is not None}


def _meta(ms: dict, n: Node | None, key: str) -> Any:
    m = ms.get(n.key) if n is not None else None
    return m.meta.get(key) if m is not None else None


def _total(ms: dict, nodes: Sequence[Node], key: str) -> int | None:
    """The sum of ``key`` over the nodes' manifests (None until all are done)."""
    found = [ms[n.key] for n in nodes]
    return sum(int(m.meta.get(key, 0)) for m in found) if found and all(found) else None


def _wall(ms: dict, nodes: Sequence[Node]) -> float | None:
    found = [ms[n.key] for n in nodes]
    return round(sum(m.timings.get("wall_s", 0.0) for m in found), 1) if found and all(found) else None


def _training(run: str, ms: dict, n: Node | None) -> dict[str, Any]:
    """Steps run / planned of the training stage that made the model, and a note
    if its time cap cut it or it changed nothing (its model is its input model)."""
    m = ms.get(n.key) if n is not None else None
    if m is None or "steps" not in m.meta:
        return {}
    steps, planned = m.meta["steps"], m.meta.get("planned_steps", m.meta["steps"])
    notes = [f"{n.stage} cut by its time cap at {steps}/{planned} steps"] if m.meta.get("cut_by_time") else []
    start = dict(n.inputs).get("policy_uri") or dict(n.inputs).get("base_uri")
    if steps == 0 or (isinstance(start, str) and m.inputs.get(store.join(run, start)) == m.digest):
        notes.append(f"{n.stage} changed no weight: the model is its input ({steps} steps{', no usable pair' if steps == 0 else ''})")
    return {"train_steps": f"{steps}/{planned}", "note": "; ".join(notes) or None}


def _reward_model(run: str, ms: dict, scored: Node | None, rewards: Node | None, pairs: Node | None) -> dict[str, Any]:
    """An iteration scored by the reward model: targets it scored, the rollouts MC
    would have run for those it decided (``rewards``, the step rewards the pairs
    read; hybrid: less those rolled out), and the model's held-out error and pair
    agreement (with the model on both sides when the pairs read its expert rewards too)."""
    if scored is None:
        return {}
    rm = store.read_manifest(store.join(run, dict(scored.inputs)["rm_uri"]))
    out = {"rm_scored": _meta(ms, scored, "predicted"), "rm_rollouts_avoided": _meta(ms, rewards, "rollouts_avoided")}
    both = pairs is not None and dict(pairs.inputs)["expert_rewards_uri"] == STAGES["expert-rm-rewards"].out_path({})
    if rm is not None:
        out.update(rm_held_out_mae=rm.meta.get("held_out_mae"), rm_pair_agreement=rm.meta.get("pair_agreement_both" if both else "pair_agreement"))
    return out


def _split(n: Node) -> str:
    return dict(n.params)["split"]


def model_row(run: str, ev: Node, nodes: Sequence[Node]) -> dict[str, Any]:
    """The row of the model that ``ev`` (a test evaluate node) evaluated, with its
    validation numbers where it has a val evaluation; every row has every column."""
    k = ev.iteration
    model = dict(ev.inputs)["model_uri"]
    trainer = next((n for n in nodes if n.key == model and n.stage in ("sft", "train")), None)
    val = next((n for n in nodes if n.stage == "evaluate" and _split(n) == "val" and dict(n.inputs)["model_uri"] == model), None)
    it = [n for n in nodes if n.iteration == k] if k is not None and k >= 1 else []
    ms = _manifests(run, [ev, val, trainer, *it])
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(model=dict(ev.params)["tag"], success_rate=_meta(ms, ev, "success_rate"), mean_reward=_meta(ms, ev, "mean_reward"))
    row.update(val_success_rate=_meta(ms, val, "success_rate"), val_mean_reward=_meta(ms, val, "mean_reward"))
    row.update(_training(run, ms, trainer))
    if it:
        by = {n.stage: n for n in it}
        row.update(outcome_pairs=_meta(ms, by.get("pairs"), "outcome"), step_pairs=_meta(ms, by.get("pairs"), "step"))
        rewards = agent_rewards_node(it)
        row.update(train_loss=_meta(ms, by.get("train"), "final_loss"), agent_step_reward_mean=_meta(ms, rewards, "mean"))
        # agent MC: estimates made; rollouts run, taken from the step-reward memo, and skipped as unable to change a pair
        mc = [n for n in it if n.stage in ("agent-mc", "hybrid-mc")]
        row.update({col: _total(ms, mc, key) for col, key in MC_COLUMNS.items()})
        expert = [n for n in it if n.stage == "expert-mc-paired"]
        row.update({col: _total(ms, expert, key) for col, key in EXPERT_MC_COLUMNS.items()})
        row.update(_reward_model(run, ms, by.get("agent-rm-rewards"), rewards, by.get("pairs")))
        row.update({col: _wall(ms, [n for n in it if n.stage in stages]) for col, stages in TIMES.items()})
    peaks = [m.timings["peak_rss_mb"] for m in ms.values() if m is not None and "peak_rss_mb" in m.timings]
    row["peak_rss_mb"] = max(peaks) if peaks else None  # the highest of the stages that made and scored this model
    return row


def result_rows(run: str, nodes: Sequence[Node]) -> list[dict[str, Any]]:
    """One row per model evaluated on the test tasks (base, sft, iter-01, ...), in DAG order."""
    return [model_row(run, n, nodes) for n in nodes if n.stage == "evaluate" and _split(n) == "test" and store.exists(store.join(run, n.key))]


def _names(models: Sequence[str]) -> str:
    return models[0] if len(models) == 1 else f"{', '.join(models[:-1])} and {models[-1]}"


SELECTED_BY = {"val": "val_mean_reward", "test": "mean_reward"}  # the split the best model is chosen on -> the row column


def evaluated_model(run: str, nodes: Sequence[Node], tag: str) -> str:
    """The URI of the checkpoint that the evaluations tagged ``tag`` scored."""
    ev = next(n for n in nodes if n.stage == "evaluate" and dict(n.params)["tag"] == tag)
    return store.join(run, dict(ev.inputs)["model_uri"])


def best(rows: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, str, str | None]:
    """The best model of ``rows``, the split it was chosen on, and a note (or None).

    SFT and the iterations compete (the untrained base does not). The highest
    validation mean reward wins where the run has validation tasks (the test
    number is then reported, not selected on); otherwise the highest test mean
    reward, and the note says so. On a tie the earliest is kept."""
    on = "val" if any(isinstance(r.get("val_mean_reward"), (int, float)) for r in rows) else "test"
    key = SELECTED_BY[on]
    trained = [r for r in rows if r["model"] != "base" and isinstance(r.get(key), (int, float))]
    if not trained:
        return None, on, "no trained model evaluated yet"
    top = trained[0]
    for r in trained[1:]:
        if r[key] > top[key]:
            top = r
    notes = [] if on == "val" else ["chosen on the test tasks: the run has no validation tasks (env.val_tasks=0)"]
    tied = [r["model"] for r in trained if r[key] == top[key]]
    if len(tied) > 1:
        notes.append(f"tie between {_names(tied)} at {top[key]:.3f} ({on}): the earliest, {top['model']}, is kept")
    if top["model"] == "sft":
        notes.append("no iteration beat SFT" if len(trained) > 1 else "no iteration evaluated yet")
    base = next((r for r in rows if r["model"] == "base" and isinstance(r.get(key), (int, float))), None)
    if base is not None and base[key] > top[key]:
        notes.append(f"the untrained base model scored higher ({base[key]:.3f}, {on})")
    return top, on, "; ".join(notes) or None


def run_data_notes(run: str, nodes: Sequence[Node], env: str) -> list[str]:
    """The report's notes on the test tasks themselves (e.g. generated games), read from the run."""
    from ipr_core.report import data_notes

    test = next((n for n in nodes if n.stage == "eval-tasks" and dict(n.params).get("split") == "test"), None)
    uri = store.join(run, test.key) if test is not None else None
    if uri is None or store.read_manifest(uri) is None:
        return []
    return data_notes(env, store.read_rows(uri, "tasks"))
