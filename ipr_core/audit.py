"""The step-reward audit: are the run's Monte Carlo step rewards (Eq. 3-5 with
the configured N) good enough to order the expert's step against the agent's?

For a sample of exploration branches of one iteration, the expert's step j+1
and the agent's step j+1 at the same prefix are re-estimated by the same
scorer with a large N (independent rollout seeds). The audit reports the mean
absolute error of the configured estimates against those references, and how
often the configured estimates order the two steps as the references do (the
paper reports 82% at N = 5). It reads a finished run and writes
``{run}/audit/iter-NN`` (kind ``audit``); it changes nothing the pipeline uses.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from ipr_core import ipr
from ipr_core.seeding import derive_seed
from ipr_core.types import Trajectory

SCORER_TAG = "audit"  # rollout seeds independent of the run's own estimates


def candidates(experts: Sequence[Trajectory], branches: Sequence[Trajectory], rewards: Sequence[Mapping], sample: int, seed: int) -> list[tuple[ipr.MCTarget, ipr.MCTarget]]:
    """(expert target, agent target) at the same prefix, where the run estimated both
    and at least one is a real estimate (not a last step, whose reward is the outcome)."""
    have = {(r["branch_id"], int(r["step"])) for r in rewards}
    by_id = {e.traj_id: e for e in experts}
    agents = {t.branch_id: t for t in ipr.branch_targets([(b.traj_id, b) for b in branches])}
    out = []
    for bid, at in agents.items():
        e = by_id.get(bid.split("|")[1])
        if e is None or at.step > len(e.steps):
            continue
        et = ipr.MCTarget(e.traj_id, e, at.step)
        if (et.branch_id, et.step) in have and (bid, at.step) in have and not (ipr.is_last_step(et) and ipr.is_last_step(at)):
            out.append((et, at))
    out.sort(key=lambda c: derive_seed(seed, SCORER_TAG, c[1].branch_id))
    return out[:sample]


def rows(cands: Sequence[tuple[ipr.MCTarget, ipr.MCTarget]], rewards: Sequence[Mapping], reference: Sequence[Mapping], n: int, n_ref: int) -> list[dict[str, Any]]:
    """One row per candidate: the run's estimates and the references (``audit`` schema)."""
    est = {(r["branch_id"], int(r["step"])): float(r["reward"]) for r in rewards}
    ref = {(r["branch_id"], int(r["step"])): float(r["reward"]) for r in reference}
    out = []
    for et, at in cands:
        ke, ka = (et.branch_id, et.step), (at.branch_id, at.step)
        if ke not in ref or ka not in ref:
            continue  # every reference rollout crashed
        out.append({
            "branch_id": at.branch_id, "task_id": at.traj.task.task_id, "step": at.step, "expert_estimate": est[ke], "agent_estimate": est[ka],
            "expert_reference": ref[ke], "agent_reference": ref[ka], "n": n, "n_reference": n_ref,
        })  # fmt: skip
    return out


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _agrees(r: Mapping) -> bool:
    """The estimates order expert vs agent as the references do."""
    return _sign(r["expert_estimate"] - r["agent_estimate"]) == _sign(r["expert_reference"] - r["agent_reference"])


def summary(audit_rows: Sequence[Mapping], tau: float) -> dict[str, Any]:
    """MAE of the estimates; direction agreement where the references differ; and, of
    the candidates the run would pair (estimates differ by more than tau_s), the share
    whose direction the references confirm."""
    errs = [abs(r[f"{s}_estimate"] - r[f"{s}_reference"]) for r in audit_rows for s in ("expert", "agent")]
    ordered = [r for r in audit_rows if r["expert_reference"] != r["agent_reference"]]
    agree = [_agrees(r) for r in ordered]
    margin = [r for r in audit_rows if abs(r["expert_estimate"] - r["agent_estimate"]) > tau]
    confirmed = [_agrees(r) for r in margin]
    return {
        "candidates": len(audit_rows), "mae": math.fsum(errs) / len(errs) if errs else None,
        "ordered": len(ordered), "direction_agreement": sum(agree) / len(agree) if agree else None,
        "over_tau": len(margin), "over_tau_confirmed": sum(confirmed) / len(confirmed) if confirmed else None, "tau_step": tau,
    }  # fmt: skip


def run_audit(cfg, run: str, iteration: int = 1, rollouts: int = 32, sample: int = 32) -> tuple[str, dict[str, Any]]:
    """Audit iteration ``iteration`` of the finished run at ``run``; returns the audit's URI and summary."""
    import tempfile
    from pathlib import Path

    from ipr_core import store
    from ipr_core.pipeline import run_plan
    from ipr_core.pipeline.dag import step_reward_keys
    from ipr_core.pipeline.runner import publish
    from ipr_core.pipeline.stage import Context, Rows
    from ipr_core.pipeline.stages import _branches, _episodes, ipr_experts, read_trajectories

    nodes = run_plan(cfg, run)
    at = {n.key: store.join(run, n.key) for n in nodes}
    explore = [u for k, u in at.items() if k.startswith(f"iter-{iteration:02d}/explore/")]
    step_rewards = step_reward_keys(nodes, iteration) or (f"iter-{iteration:02d}/expert_rewards", f"iter-{iteration:02d}/agent_rewards")
    need = ["experts/train", "sft/model", *step_rewards]
    missing = [k for k in need if k not in at or not store.exists(at[k])] + [u for u in explore if not store.exists(u)]
    if missing or not explore:
        raise store.ArtifactNotFound(f"{run}: the audit needs iteration {iteration}'s exploration and step rewards; missing: {', '.join(missing) or 'exploration'}")
    rewards = [r for k in step_rewards for r in store.read_rows(at[k], "step_rewards")]
    cands = candidates(ipr_experts(cfg, read_trajectories(at["experts/train"])), _branches(explore), rewards, sample, cfg.seed)
    targets = list({(t.branch_id, t.step): t for c in cands for t in c}.values())
    specs = ipr.mc_specs(targets, rollouts, cfg.seed, scorer=SCORER_TAG)
    with tempfile.TemporaryDirectory(prefix="ipr-audit-") as tmp:
        eps, cost = _episodes(Context(cfg, Path(tmp), f"audit/iter-{iteration:02d}"), at["sft/model"], specs, cfg.mc.temperature)
    reference = ipr.step_rewards(targets, ipr.mc_rollout_rows(eps))
    out_rows = rows(cands, rewards, reference, cfg.mc.n_rollouts, rollouts)
    meta = {**summary(out_rows, cfg.pairs.tau_step), "n": cfg.mc.n_rollouts, "n_reference": rollouts, "rollouts": len(eps), **cost}
    out = store.join(run, "audit", f"iter-{iteration:02d}")
    publish(out, "audit", Rows(out_rows), meta=meta)
    return out, meta
