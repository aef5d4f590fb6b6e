"""Data-parallel generation: rows split over replica processes, same results as one policy."""

from __future__ import annotations

from collections import Counter, OrderedDict
from functools import partial

import pytest

from fake_env import LineWorld, ScriptedPolicy, conversations, scripted_replica
from ipr_core.policies.base import PolicyError, SamplingParams
from ipr_core.policies.replicated import ReplicatedPolicy, assign_rows, head_key
from ipr_core.rollout import EpisodeSpec, run_episodes, run_sequential

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


def test_rows_are_balanced_and_heads_stay_where_they_were():
    sticky: OrderedDict = OrderedDict()
    keys = [f"h{i // 4}" for i in range(32)]  # 8 heads x 4 rows (MC-shaped)
    first = assign_rows(keys, sticky, 2)
    assert Counter(first) == {0: 16, 1: 16}
    assert all(len({first[i] for i in range(32) if keys[i] == k}) == 1 for k in set(keys))  # a head is not split
    assert assign_rows(keys, sticky, 2) == first  # deterministic and sticky
    # Heads of replica 0 retire: the rest rebalances, moving as few heads as it must.
    gone = {k for k in set(keys) if first[keys.index(k)] == 0}
    rest = [k for k in keys if k not in gone] + ["n0", "n1", "n2", "n3"]
    again = assign_rows(rest, sticky, 2)
    assert max(Counter(again).values()) <= -(-len(rest) // 2) + len(rest) // 16
    kept = [k for k in set(rest) if k in set(keys)]
    assert sum(again[rest.index(k)] == first[keys.index(k)] for k in kept) >= len(kept) - 2
    # One head bigger than a fair share (N identical rows) is split.
    assert Counter(assign_rows(["same"] * 10, OrderedDict(), 2)) == {0: 5, 1: 5}
    assert assign_rows(["a", "b", "c"], OrderedDict(), 3) == [0, 1, 2]
    # The head key ignores everything after the instruction.
    c = conversations(1)[0]
    assert head_key(c) == head_key(c[:2] + [{"role": "assistant", "content": "x"}]) != head_key([c[0], {"role": "user", "content": "other"}])


def test_replicated_runner_equals_one_policy_and_sequential():
    env = LineWorld(max_steps=6)
    specs = [EpisodeSpec(f"e{i}", t, seed=i) for i, t in enumerate(env.list_tasks("test", 12))]
    ref = run_sequential(LineWorld, ScriptedPolicy(), specs, GREEDY, history=2)
    with ReplicatedPolicy(scripted_replica, 2) as policy:
        assert run_episodes(LineWorld, policy, specs, GREEDY, history=2, batch_size=8) == ref
        convs = conversations(6)
        assert policy.generate(convs, GREEDY, list(range(6))) == ScriptedPolicy().generate(convs, GREEDY, list(range(6)))
        assert policy.generate([], GREEDY, []) == []
        with pytest.raises(ValueError, match="2 conversations but 1 seeds"):
            policy.generate(convs[:2], GREEDY, [0])
    with pytest.raises(PolicyError, match="closed"):
        policy.generate(convs, GREEDY, list(range(6)))


def test_replica_failures_are_raised_clearly():
    with pytest.raises(FileNotFoundError, match="no model at /nowhere/model") as info:
        ReplicatedPolicy(partial(scripted_replica, missing="/nowhere/model"), 2)
    assert any("generation replica" in n for n in getattr(info.value, "__notes__", []))

    policy = ReplicatedPolicy(scripted_replica, 2)
    convs = conversations(4)
    boom = [[{"role": "system", "content": "s"}, {"role": "user", "content": "boom"}]]
    # a transient error inside a replica keeps its type (retryable) and names the replica; the others go on
    with pytest.raises(PolicyError, match="scripted failure: boom") as info:
        policy.generate(convs + boom, GREEDY, list(range(5)))
    assert any("in generation replica" in n and "Traceback" in n for n in info.value.__notes__)
    assert len(policy.generate(convs, GREEDY, list(range(4)))) == 4
    # a replica that dies: PolicyError with its exit code, and the policy is closed
    die = [[{"role": "system", "content": "s"}, {"role": "user", "content": "die"}]]
    with pytest.raises(PolicyError, match=r"generation replica \d \(pid \d+\) exited with code 3 during generate"):
        policy.generate(convs + die, GREEDY, list(range(5)))
    with pytest.raises(PolicyError, match="closed"):
        policy.generate(convs, GREEDY, list(range(4)))
    assert all(not p.is_alive() for p in policy._procs)
    policy.close()  # idempotent


def test_lanes_answer_per_replica_and_fail_without_stale_replies():
    convs, ref = conversations(6), ScriptedPolicy()
    with ReplicatedPolicy(scripted_replica, 2) as policy:
        assert policy.lanes == 2
        policy.submit(0, convs[:2], GREEDY, [0, 1])
        policy.submit(1, convs[2:], GREEDY, [2, 3, 4, 5])
        with pytest.raises(PolicyError, match="already has a request in flight"):
            policy.submit(1, convs[:1], GREEDY, [0])
        with pytest.raises(PolicyError, match=r"while lanes \[0, 1\] have requests in flight"):
            policy.generate(convs, GREEDY, list(range(6)))
        got = dict([policy.collect(), policy.collect()])
        assert got == {0: ref.generate(convs[:2], GREEDY, [0, 1]), 1: ref.generate(convs[2:], GREEDY, [2, 3, 4, 5])}
        with pytest.raises(PolicyError, match="no request in flight"):
            policy.collect()
        with pytest.raises(ValueError, match="out of range"):
            policy.submit(2, convs[:1], GREEDY, [0])
        # a failing lane is raised (once every lane still in flight answered: nothing stale is left);
        # lane 1 may answer first, so a second collect may be the one that raises
        boom = [[{"role": "system", "content": "s"}, {"role": "user", "content": "boom"}]]
        policy.submit(0, boom, GREEDY, [0])
        policy.submit(1, convs[:3], GREEDY, [0, 1, 2])
        with pytest.raises(PolicyError, match="scripted failure: boom"):
            for _ in range(2):
                assert policy.collect() == (1, ref.generate(convs[:3], GREEDY, [0, 1, 2]))
        assert policy.generate(convs, GREEDY, list(range(6))) == ref.generate(convs, GREEDY, list(range(6)))
        # drained replies are dropped, not read by the next call
        policy.submit(0, convs[:1], GREEDY, [7])
        policy.drain()
        assert policy.generate(convs[1:3], GREEDY, [1, 2]) == ref.generate(convs[1:3], GREEDY, [1, 2])
        # a dying replica closes the policy
        die = [[{"role": "system", "content": "s"}, {"role": "user", "content": "die"}]]
        policy.submit(1, die, GREEDY, [0])
        with pytest.raises(PolicyError, match=r"generation replica 1 \(pid \d+\) exited with code 3 during generate"):
            policy.collect()
        with pytest.raises(PolicyError, match="closed"):
            policy.submit(0, convs[:1], GREEDY, [0])


def test_replicated_runner_drives_one_cohort_per_lane():
    env = LineWorld(max_steps=6)
    specs = [EpisodeSpec(f"e{i}", t, seed=i) for i, t in enumerate(env.list_tasks("test", 12))]
    ref = run_sequential(LineWorld, ScriptedPolicy(), specs, GREEDY, history=2)

    class Recording:  # the lane calls the runner makes, passed through
        def __init__(self, policy):
            self.policy, self.lanes, self.submitted = policy, policy.lanes, []

        def submit(self, lane, conversations, sampling, seeds):
            self.submitted.append((lane, len(conversations)))
            self.policy.submit(lane, conversations, sampling, seeds)

        def collect(self):
            return self.policy.collect()

        def drain(self):
            self.policy.drain()

        def generate(self, *args):
            raise AssertionError("generate is not used when the policy has lanes")

        def close(self):
            pass

    with ReplicatedPolicy(scripted_replica, 2) as policy:
        rec = Recording(policy)
        assert run_episodes(LineWorld, rec, specs, GREEDY, history=2, batch_size=8) == ref
        assert {lane for lane, _ in rec.submitted} == {0, 1} and max(n for _, n in rec.submitted) == 4  # 8 slots, 4 per cohort


@pytest.mark.slow
def test_transformers_replicas_equal_one_policy_and_keep_their_prefix_caches(tmp_path):
    pytest.importorskip("torch")
    from fake_env import tiny_model
    from ipr_core.config import ModelConfig, SamplingConfig
    from ipr_core.policies.factory import make_policy
    from ipr_core.policies.hf import TransformersPolicy

    path = tiny_model(tmp_path / "m", spread=0.15)
    sampled = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10)
    convs = [c for c in conversations(8) for _ in range(2)]  # pairs of identical rows, several heads
    seeds = list(range(100, 100 + len(convs)))
    one = TransformersPolicy(path, device="cpu")
    policy = make_policy(ModelConfig(device="cpu", replicas=2, replica_threads=1), SamplingConfig(), str(path))
    try:
        assert isinstance(policy, ReplicatedPolicy) and policy.replicas == 2
        for sampling in (GREEDY, sampled):
            assert policy.generate(convs, sampling, seeds) == one.generate(convs, sampling, seeds)
        st = policy.stats
        assert st.requests == 2 * len(convs) and st.calls >= 2 and st.prefill_tokens > 0
        # The second call found the first call's KV in the replica its head went to.
        assert st.cached_prefill_tokens > 0
        policy.reset_stats()
        assert policy.stats.requests == 0
        env = LineWorld(max_steps=4)
        specs = [EpisodeSpec(f"e{i}", t, seed=i) for i, t in enumerate(env.list_tasks("test", 6))]
        assert run_episodes(LineWorld, policy, specs, GREEDY, history=2, batch_size=6) == run_sequential(LineWorld, one, specs, GREEDY, history=2)
    finally:
        policy.close()
    with pytest.raises(ValueError, match="replicas"):
        make_policy(ModelConfig(backend="openai", replicas=2), SamplingConfig(), "m")
