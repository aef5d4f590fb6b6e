"""The step-reward memo (``mc.memo``): exact reuse of the scorer's estimates on a
real tiny BabyAI run, identical pairs with and without it, and entries that
survive a SIGKILL in the middle of agent MC."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY_RUN
from ipr_core import ipr, lease, mc_memo, store
from ipr_core.config import load_config
from ipr_core.pipeline import memo, run_local, run_uri
from ipr_core.pipeline.runner import Call, execute, publish
from ipr_core.pipeline.stage import Rows
from ipr_core.pipeline.stages import STAGES, ipr_experts, read_trajectories

ROOT = Path(__file__).resolve().parents[1]
# Every branch is scored (the memo is about reuse, not about skipping), two iterations.
MEMO_RUN = [*TINY_RUN, "env.train_tasks=3", "pipeline.iterations=2", "mc.score_all_branches=true", "pairs.tau_outcome=0.0"]


def _run(root, name: str, *extra: str, until: str = "iter-02/pairs"):
    pytest.importorskip("minigrid")
    cfg = load_config(None, [*MEMO_RUN, f"storage.root={root}", f"run_name={name}", *extra])
    run_local(cfg, until=until)
    return cfg, run_uri(cfg)


def _meta(run: str, key: str) -> dict:
    return dict(store.read_manifest(store.join(run, key)).meta)


def _shards(run: str, what: str) -> list[str]:
    return sorted(i.uri for i in store.ls(store.join(run, what)) if i.complete)


@pytest.fixture(scope="module")
def memo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("memo")
    cfg, run = _run(root, "with")
    return root, cfg, run


def test_a_branch_that_repeats_the_expert_gets_the_experts_reward_with_no_rollouts(memo_run):
    root, cfg, run = memo_run
    expert = next(e for e in ipr_experts(cfg, read_trajectories(store.join(run, "experts/train"))) if len(e.steps) >= 3)
    # the agent, restored to e_{1:1}, took exactly the expert's step 2 (thought and action) and went on as the expert
    bid = ipr.branch_id(9, expert.traj_id, 1)
    branch = dataclasses.replace(expert, traj_id=bid, source="agent", prefix_len=1)
    branches = store.join(str(root), "handmade", "branches")
    publish(branches, "branches", Rows(ipr.branch_rows([branch], 9)))

    mc_out = store.join(str(root), "handmade", "agent_mc")
    inputs = {"scorer_uri": store.join(run, "sft/model"), "branches_uri": branches, "experts_uri": store.join(run, "experts/train"), "expert_rewards_uri": store.join(run, "scorer/expert_rewards")}
    execute(Call(STAGES["agent-mc"], mc_out, {"iteration": 9, "shard": 0}, inputs), cfg, str(root))
    m = store.read_manifest(mc_out).meta
    assert m["estimates"] == 1 and m["rollouts"] == 0 and m["targets_reused"] == 1 and m["same_step_as_expert"] == 1, m

    rewards_out = store.join(str(root), "handmade", "agent_rewards")
    call = Call(STAGES["agent-rewards"], rewards_out, {"iteration": 9}, {"branches_uris": [branches], "experts_uri": inputs["experts_uri"], "expert_rewards_uri": inputs["expert_rewards_uri"], "mc_uris": [mc_out]})
    execute(call, cfg, str(root))
    [mine] = store.read_rows(rewards_out, "step_rewards")
    theirs = {(r["branch_id"], r["step"]): r for r in store.read_rows(store.join(run, "scorer/expert_rewards"), "step_rewards")}[(expert.traj_id, 2)]
    assert (mine["reward"], mine["n_rollouts"]) == (theirs["reward"], theirs["n_rollouts"]) and mine["n_rollouts"] == cfg.mc.n_rollouts


def test_the_second_iteration_reuses_the_first_iterations_estimates(memo_run):
    _, cfg, run = memo_run
    n = cfg.mc.n_rollouts
    rows = lambda it: {(r["branch_id"].split("|", 1)[1], r["step"], r["rollout"]): r for u in _shards(run, f"iter-{it:02d}/agent_mc") for r in store.read_rows(u, "mc_rollouts")}  # noqa: E731
    first, second = rows(1), rows(2)
    context = lambda it: {  # noqa: E731  the scored targets: each branch's first own action, unless it ended the episode
        t.branch_id.split("|", 1)[1]: mc_memo.keys(mc_memo.Scope("", {}), t.traj, t.step, cfg.sampling.history_turns).exact
        for u in _shards(run, f"iter-{it:02d}/explore") for t in ipr.branch_targets((b.traj_id, b) for b in read_trajectories(u, "branches"))
        if not ipr.is_last_step(t)
    }  # fmt: skip
    c1, c2 = context(1), context(2)
    same = [k for k in c2 if c1.get(k) == c2[k]]  # same expert, same j, same step proposed at the same prefix
    assert same, "the tiny agent proposed no step twice: nothing to reuse"
    metas = [_meta(run, f"iter-02/agent_mc/shard-{s:03d}") for s in range(len(_shards(run, "iter-02/agent_mc")))]
    reused = sum(m["targets_reused"] for m in metas)
    assert reused >= len(same) and sum(m["rollouts"] for m in metas) == n * (sum(m["estimates"] for m in metas) - reused)
    for k in same:  # the very same rollouts: seeds and outcomes
        for key in [x for x in second if x[0] == k]:
            assert (second[key]["seed"], second[key]["outcome_reward"]) == (first[key]["seed"], first[key]["outcome_reward"])


def test_pairs_are_the_same_with_and_without_the_memo(memo_run, tmp_path):
    _, _, with_memo = memo_run
    _, without = _run(tmp_path, "without", "mc.memo=false")
    assert not (tmp_path / memo.MEMO).exists()
    m = _meta(without, "iter-02/agent_mc/shard-000")
    assert m["targets_reused"] == 0 and m["rollouts"] == 2 * m["estimates"]
    for key in ("scorer/expert_rewards", "iter-01/agent_rewards", "iter-02/agent_rewards", "iter-01/pairs", "iter-02/pairs"):
        kind = "pairs" if key.endswith("pairs") else "step_rewards"
        a, b = (sorted(store.read_rows(store.join(r, key), kind), key=str) for r in (with_memo, without))
        assert a == b and a, key


_KILLED = """
import sys
sys.path.insert(0, "tests")
from test_mc_memo import _run
_run(sys.argv[1], "killed", "mc.n_rollouts=6", "mc.memo_flush=1", until="iter-01/agent_mc/shard-001")
"""


def test_a_sigkill_in_agent_mc_keeps_the_entries_written_before_it(tmp_path):
    pytest.importorskip("minigrid")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED, str(tmp_path)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    memo_dir, deadline, seen = tmp_path / memo.MEMO, time.time() + 600, []
    try:
        while time.time() < deadline and proc.poll() is None:
            seen = [p for p in memo_dir.glob("mc/*/iter-01_agent_mc_shard-000-*") if (p / store.MANIFEST).exists()]
            if seen:
                break
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert seen, "agent MC wrote no memo entry before the run ended"
    run = str(tmp_path / "killed")
    assert not store.exists(store.join(run, "iter-01/agent_mc/shard-000")), "the kill came after the stage finished"
    kept = [r for p in memo_dir.glob("mc/*/iter-01_agent_mc_shard-000-*") if (p / store.MANIFEST).exists() for r in store.read_rows(str(p), "mc_memo")]
    assert len(kept) >= 6 * len(seen) and len(kept) % 6 == 0

    os.remove(store.join(run, lease.LEASE))  # the killed holder's lease (``--take-over``)
    _run(tmp_path, "killed", "mc.n_rollouts=6", "mc.memo_flush=1", until="iter-01/agent_mc/shard-000")
    m = _meta(run, "iter-01/agent_mc/shard-000")
    assert m["targets_reused"] >= len(kept) // 6 and m["rollouts"] == 6 * (m["estimates"] - m["targets_reused"]), m
