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
