"""Agent MC skips branches that cannot make a pair (exact for the pairs), unless
``mc.score_all_branches`` asks for every branch: on a real tiny BabyAI run."""

from __future__ import annotations

import pytest

from helpers import TINY_RUN
from ipr_core import store
from ipr_core.config import load_config
from ipr_core.pipeline import run_local, run_plan, run_uri
from ipr_core.pipeline.stages import ipr_experts, read_trajectories


def _run(root, name: str, *extra: str):
    cfg = load_config(None, [*TINY_RUN, "env.train_tasks=3", f"storage.root={root}", f"run_name={name}", *extra])
    run_local(cfg, until="iter-01/pairs")
    return cfg, run_uri(cfg)


def test_unpairable_branches_run_no_rollouts_and_pairs_are_unchanged(tmp_path):
    pytest.importorskip("minigrid")
    # tau_o = 0.8: of this seed's experts (outcomes 0.91, 0.775, 0.775), only the first
    # is more than tau_o above the untrained agent's failed branches (outcome 0)
    cfg, skip = _run(tmp_path, "skip", "pairs.tau_outcome=0.8")
    _, full = _run(tmp_path, "all", "pairs.tau_outcome=0.8", "mc.score_all_branches=true")  # copies experts, SFT, expert MC and exploration
    mc = lambda run: store.read_manifest(store.join(run, "iter-01/agent_mc/shard-000"))  # noqa: E731
    a, b = mc(skip), mc(full)
    n = cfg.mc.n_rollouts
    assert a.meta["skipped_targets"] > 0 and b.meta["skipped_targets"] == 0
    assert a.meta["targets"] + a.meta["skipped_targets"] == b.meta["targets"]
    assert a.meta["rollouts"] < b.meta["rollouts"] and a.meta["skipped_rollouts"] == n * a.meta["skipped_targets"]

    # which branches were scored: exactly those whose outcome differs from the expert's by more than tau_o
    branches = {r["traj_id"]: r for r in store.read_rows(store.join(skip, "iter-01/explore/shard-000"), "branches")}
    scored = {r["branch_id"] for r in store.read_rows(store.join(skip, "iter-01/agent_mc/shard-000"), "mc_rollouts")}
    experts = {r["traj_id"]: r["outcome_reward"] for r in store.read_rows(store.join(skip, "experts/train"), "trajectories")}
    for bid in scored:
        assert abs(branches[bid]["outcome_reward"] - experts[bid.split("|")[1]]) > cfg.pairs.tau_outcome

    # and the pairs are the same rows either way
    pairs = lambda run: sorted(store.read_rows(store.join(run, "iter-01/pairs"), "pairs"), key=lambda r: r["pair_id"])  # noqa: E731
    assert pairs(skip) == pairs(full) and len(pairs(skip)) > 0


def test_without_step_pairs_no_mc_runs_at_all(tmp_path):
    """ETO (outcome pairs only) uses no step reward: it explores from the task's start
    only, and neither expert nor agent MC is in its DAG."""
    pytest.importorskip("minigrid")
    cfg, eto = _run(tmp_path, "eto", "pairs.step_pairs=false")
    keys = {n.key for n in run_plan(cfg, eto)}
    assert not {k for k in keys if "_mc/" in k}, sorted(keys)
    branches = [r for s in ("shard-000", "shard-001") for r in store.read_rows(store.join(eto, "iter-01/explore", s), "branches")]
    experts = ipr_experts(cfg, read_trajectories(store.join(eto, "experts/train")))
    assert sorted(b["branch_id"] for b in branches) == sorted(f"it01|{e.traj_id}|j0" for e in experts)  # one from each start
    assert store.read_rows(store.join(eto, "iter-01/expert_rewards"), "step_rewards") == []
    pairs = store.read_rows(store.join(eto, "iter-01/pairs"), "pairs")
    assert pairs and {p["kind"] for p in pairs} == {"outcome"}
