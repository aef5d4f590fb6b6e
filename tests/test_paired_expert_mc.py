"""``mc.expert_steps=paired`` (the default): each iteration rolls out only the
expert steps its scored branches are compared with, estimates carry across
iterations through the memo, and the pairs are those of scoring every expert
step up front (``mc.expert_steps=all``); agent MC skips the branches whose
expert reward leaves no step margin to win: on a real tiny BabyAI run."""

from __future__ import annotations

import pytest

from helpers import TINY_RUN
from ipr_core import ipr, store
from ipr_core.config import load_config
from ipr_core.pipeline import run_local, run_plan, run_uri
from ipr_core.pipeline.stages import _agent_targets, _branches, ipr_experts, read_trajectories

# two iterations; tau_o = 0 so that most branches are scored (more expert steps compared)
RUN = [*TINY_RUN, "env.train_tasks=3", "pipeline.iterations=2", "pairs.tau_outcome=0.0"]


def _run(root, name: str, *extra: str):
    pytest.importorskip("minigrid")
    cfg = load_config(None, [*RUN, f"storage.root={root}", f"run_name={name}", *extra])
    run_local(cfg, until="iter-02/pairs")
    return cfg, run_uri(cfg)


def _rows(run: str, key: str, kind: str) -> list[dict]:
    return sorted(store.read_rows(store.join(run, key), kind), key=str)


def _mc(run: str, nodes, stage: str, k: int | None = None) -> list[dict]:
    return [dict(store.read_manifest(store.join(run, n.key)).meta) for n in nodes if n.stage == stage and n.iteration == k]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # separate roots: each with its own memo, so neither reuses the other's estimates
    paired = _run(tmp_path_factory.mktemp("paired"), "paired")
    up_front = _run(tmp_path_factory.mktemp("all"), "all", "mc.expert_steps=all")
    return paired, up_front


def test_branches_the_expert_reward_rules_out_run_no_rollouts_and_change_no_pair(runs, tmp_path):
    """With the expert's reward known first, a branch that no agent reward in [0, 1]
    could pair is skipped (ipr.decidable_targets): the pairs equal scoring every branch."""
    (cfg, paired), _ = runs
    _, every = _run(tmp_path, "every", "mc.score_all_branches=true")
    nodes = run_plan(cfg, paired)
    by_bound = sum(m["skipped_by_expert_reward"] for k in (1, 2) for m in _mc(paired, nodes, "agent-mc", k))
    assert by_bound > 0, "no branch was ruled out by its expert's reward: the test shows nothing"
    for key in ("iter-01/pairs", "iter-02/pairs"):
        assert _rows(paired, key, "pairs") == _rows(every, key, "pairs"), key
    assert any(p["kind"] == "step" for p in _rows(paired, "iter-01/pairs", "pairs"))


def test_pairs_and_models_are_those_of_scoring_every_expert_step(runs):
    (_, paired), (_, up_front) = runs
    for key in ("iter-01/pairs", "iter-02/pairs", "iter-01/agent_rewards", "iter-02/agent_rewards"):
        kind = "pairs" if key.endswith("pairs") else "step_rewards"
        a, b = _rows(paired, key, kind), _rows(up_front, key, kind)
        assert a == b, key
    assert _rows(paired, "iter-01/pairs", "pairs") or _rows(paired, "iter-02/pairs", "pairs")
    assert store.digest(store.join(paired, "iter-01/model")) == store.digest(store.join(up_front, "iter-01/model"))


def test_each_iteration_scores_exactly_the_expert_steps_its_branches_face(runs):
    (cfg, paired), (_, up_front) = runs
    nodes = run_plan(cfg, paired)
    assert not {n.key for n in nodes} & {"scorer/expert_rewards", "scorer/expert_mc/shard-000"}
    every = {(r["branch_id"], r["step"]): r for r in store.read_rows(store.join(up_front, "scorer/expert_rewards"), "step_rewards")}
    experts = ipr_experts(cfg, read_trajectories(store.join(paired, "experts/train")))
    for k in (1, 2):
        explore = [n.key for n in nodes if n.stage == "explore" and n.iteration == k]
        scored, _ = _agent_targets(cfg, _branches([store.join(paired, e) for e in explore]), experts)
        faced = {(t.branch_id.split("|")[1], t.step) for t in scored}
        mine = {(r["branch_id"], r["step"]): r for r in store.read_rows(store.join(paired, f"iter-{k:02d}/expert_rewards"), "step_rewards")}
        assert set(mine) == faced and faced, k
        assert all(mine[x] == every[x] for x in mine), k  # the very estimates of scoring them all up front
    # fewer expert steps than every one of them: step 1 is never compared (j = 0 branches make outcome pairs)
    nonfinal = [t for t in ipr.expert_targets(experts) if not ipr.is_last_step(t)]
    ran = sum(m["rollouts"] for k in (1, 2) for m in _mc(paired, nodes, "expert-mc-paired", k))
    assert 0 < ran < cfg.mc.n_rollouts * len(nonfinal)


def test_the_second_iteration_reuses_the_first_iterations_expert_estimates(runs):
    (cfg, paired), _ = runs
    nodes = run_plan(cfg, paired)
    first = {(r["branch_id"], r["step"]) for r in store.read_rows(store.join(paired, "iter-01/expert_rewards"), "step_rewards") if not r["is_last"]}
    second = {(r["branch_id"], r["step"]) for r in store.read_rows(store.join(paired, "iter-02/expert_rewards"), "step_rewards") if not r["is_last"]}
    again = first & second
    assert again, "the two iterations faced no common expert step: nothing to reuse"
    metas = _mc(paired, nodes, "expert-mc-paired", 2)
    reused = sum(m["targets_reused"] for m in metas)
    assert reused == len(again)  # all of them, and only them
    assert sum(m["rollouts"] for m in metas) == cfg.mc.n_rollouts * (len(second) - reused)
