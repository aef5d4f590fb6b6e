"""The lock-step runner against the one-at-a-time reference, on fast fakes and a tiny model."""

from __future__ import annotations

import logging
from functools import partial

import pytest

from fake_env import Crash, LineWorld, ScriptedPolicy, expert_steps
from ipr_core.policies.base import SamplingParams
from ipr_core.rollout import MALFORMED_OBSERVATION, EpisodeSpec, run_episodes, run_sequential, turn_seed
from ipr_core.seeding import derive_seed
from ipr_core.types import Step

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def _specs(n: int = 10, max_steps: int = 6) -> list[EpisodeSpec]:
    """A mix: from scratch, from expert prefixes, one ending during the replay,
    one whose prefix already uses the whole step budget, and N samples per start."""
    env = LineWorld(max_steps=max_steps)
    out = []
    for i, task in enumerate(env.list_tasks("test", n)):
        _, steps = expert_steps(env, task)
        j = i % (len(steps) + 1)  # 0..len(steps): j == len(steps) ends during replay
        out.append(EpisodeSpec(f"e{i}", task, tuple(steps[:j]), seed=derive_seed(1, i)))
    task = env.list_tasks("test", 1)[0]
    long_prefix = tuple(Step("dither", "jump", "x", 0.0) for _ in range(max_steps))
    out.append(EpisodeSpec("limit", task, long_prefix, seed=3))
    out += [EpisodeSpec(f"mc{k}", task, (), seed=derive_seed(2, k), source="scorer") for k in range(4)]
    return out


def test_lockstep_equals_sequential_and_batches():
    specs = _specs()
    ref_policy = ScriptedPolicy()
    ref = run_sequential(LineWorld, ref_policy, specs, GREEDY, history=2)
    policy = ScriptedPolicy()
    got = run_episodes(LineWorld, policy, specs, GREEDY, history=2, concurrency=6, batch_size=4)
    assert got == ref
    assert [t.traj_id for t in got] == [s.key for s in specs]
    assert max(policy.calls) == 4 and len(policy.calls) < len(ref_policy.calls) / 2
    # threads for slow environments change nothing either
    assert run_episodes(partial(LineWorld, step_delay_s=0.001), ScriptedPolicy(), specs, GREEDY, history=2, workers=3, batch_size=8) == ref
    # the fakes exercise every path: env steps, malformed replies, done, limits, replay ends
    steps = [s for t in ref for s in t.steps[t.prefix_len :]]
    assert any(s.action == "" for s in steps) and any(s.action in ("left", "right") for s in steps)
    assert any(t.done and t.success for t in ref) and any(not t.done for t in ref)


def test_stats_count_malformed_replies_and_invalid_actions_of_the_agent_only():
    """What a stuck model does (ALFWorld's tiny model: most actions "Nothing
    happens.") is in the stats: the environment's invalid flag, counted on the
    agent's steps, never on a replayed prefix."""
    specs = _specs()
    got: list = []
    trajs = run_episodes(LineWorld, ScriptedPolicy(), specs, GREEDY, history=2, concurrency=6, batch_size=4, on_stats=got.append)
    agent = [s for t in trajs for s in t.steps[t.prefix_len :]]
    invalid = sum(s.observation.startswith("Nothing happens") for s in agent)
    prefix_invalid = sum(s.observation.startswith("Nothing happens") for t in trajs for s in t.steps[: t.prefix_len])
    [stats] = got
    assert stats.invalid == invalid > 0 and stats.malformed == sum(s.action == "" for s in agent) > 0
    assert f"{stats.invalid} invalid actions" in stats.summary()
    assert prefix_invalid > 0  # the "limit" spec replays 6 invalid expert steps: not the agent's


class TwoLanes:
    """A policy with two lanes (as ``ReplicatedPolicy``), answered in process:
    the higher lane first whenever both are in flight, so one cohort runs ahead
    of the other; ``fail_at``: the collect call that raises instead."""

    lanes = 2

    def __init__(self, fail_at: int | None = None):
        self.inner, self.fail_at = ScriptedPolicy(), fail_at
        self.pending: dict = {}
        self.answered: list[int] = []
        self.drained = 0

    def submit(self, lane, conversations, sampling, seeds):
        assert lane not in self.pending and len(conversations) <= 3  # a cohort: half of the 6 slots
        self.pending[lane] = (conversations, sampling, seeds)

    def collect(self):
        if len(self.answered) + 1 == self.fail_at:
            raise RuntimeError("lane failed")
        lane = max(self.pending)
        self.answered.append(lane)
        return lane, self.inner.generate(*self.pending.pop(lane))

    def drain(self):
        self.drained += 1
        self.pending.clear()

    def generate(self, conversations, sampling, seeds):
        raise AssertionError("a policy with lanes is driven through submit/collect")

    def close(self):
        pass


def test_cohorts_per_lane_go_on_as_their_lane_answers():
    specs = _specs()
    ref = run_sequential(LineWorld, ScriptedPolicy(), specs, GREEDY, history=2)
    lanes = TwoLanes()
    assert run_episodes(LineWorld, lanes, specs, GREEDY, history=2, concurrency=6) == ref
    # lane 1's cohort took several turns in a row while lane 0's request waited
    assert lanes.answered[:3] == [1, 1, 1] and set(lanes.answered) == {0, 1} and lanes.drained == 0
    # a cohort larger than batch_size: one lane, through generate
    with pytest.raises(AssertionError, match="submit/collect"):
        run_episodes(LineWorld, TwoLanes(), specs, GREEDY, history=2, concurrency=6, batch_size=2)
    # a policy error propagates, and the lane still in flight is drained first
    failing = TwoLanes(fail_at=3)
    with pytest.raises(RuntimeError, match="lane failed"):
        run_episodes(LineWorld, failing, specs, GREEDY, history=2, concurrency=6)
    assert failing.drained == 1 and not failing.pending


def test_prefix_replay_uses_fresh_observations_and_can_finish_the_episode():
    env = LineWorld()
    task = env.list_tasks("test", 3)[2]
    _, expert = expert_steps(env, task)
    stale = tuple(Step(f"my thought {i}", s.action, "stale observation", -1.0) for i, s in enumerate(expert))
    part, full = EpisodeSpec("part", task, stale[:1]), EpisodeSpec("full", task, stale)
    a, b = run_episodes(LineWorld, ScriptedPolicy(), [part, full], GREEDY, history=None)
    assert a.prefix_len == 1 and a.steps[0] == Step("my thought 0", expert[0].action, expert[0].observation, expert[0].reward)
    assert b.prefix_len == len(expert) and len(b.steps) == len(expert)  # finished during replay: no agent step
    assert [s.observation for s in b.steps] == [s.observation for s in expert]
    assert b.done and b.success and b.outcome_reward == expert[-1].reward
    assert run_sequential(LineWorld, ScriptedPolicy(), [part, full], GREEDY, history=None) == [a, b]


def test_malformed_reply_is_a_step_without_env_step_and_keeps_the_reward():
    class Babble(ScriptedPolicy):
        def generate(self, conversations, sampling, seeds):
            return ["Thought: hmm, no idea"] * len(conversations)

    envs: list[LineWorld] = []
    env = LineWorld()
    task = env.list_tasks("test", 1)[0]
    _, expert = expert_steps(env, task)
    first = expert[0]
    assert not first.reward == 0  # the dense partial reward makes "reward kept" observable
    [t] = run_episodes(partial(LineWorld, max_steps=4, registry=envs), Babble(), [EpisodeSpec("k", task, (first,))], GREEDY, history=2)
    assert len(t.steps) == 4 and t.prefix_len == 1
    for s in t.steps[1:]:
        assert s.action == "" and s.observation == MALFORMED_OBSERVATION and s.reward == first.reward
        assert s.assistant_text() == "Thought: hmm, no idea"  # the reply verbatim, no invented "Action:" line
    assert "Action: ..." in MALFORMED_OBSERVATION
    assert envs[0]._n == 1  # only the replayed step reached the environment
    assert t.outcome_reward == first.reward and not t.done and not t.success and t.error is None
    assert all(e.closed for e in envs)
    # a malformed prefix step is replayed without stepping the environment either
    [u] = run_episodes(LineWorld, Babble(), [EpisodeSpec("m", task, t.steps[:3])], GREEDY, history=2, max_steps=3)
    assert u.steps == t.steps[:3] and u.prefix_len == 3


def test_records_the_action_as_the_environment_canonicalised_it():
    class Alias(ScriptedPolicy):
        def generate(self, conversations, sampling, seeds):
            return ["Thought: go\nAction: r"] * len(conversations)

    task = LineWorld().list_tasks("test", 1)[0]
    [t] = run_episodes(LineWorld, Alias(), [EpisodeSpec("a", task)], GREEDY, history=2, max_steps=2)
    assert [s.action for s in t.steps] == ["right", "right"][: len(t.steps)]
    # ... so that replaying the trajectory as a prefix is exact
    [u] = run_episodes(LineWorld, Alias(), [EpisodeSpec("b", task, t.steps)], GREEDY, history=2, max_steps=2)
    assert u.steps == t.steps


@pytest.mark.parametrize("on", ["step", "reset"])
def test_env_errors_are_isolated_retried_once_then_recorded(on):
    specs = _specs(6)
    clean = run_sequential(LineWorld, ScriptedPolicy(), specs, GREEDY, history=2)
    flaky = {"test-1": 1, "test-2": 2}  # test-1 recovers on the retry, test-2 never does
    expected_errors = {s.key for s in specs if s.task.task_id == "test-2"}
    assert all(sum(s.task.task_id == tid for s in specs) == 1 for tid in flaky)
    results = {}
    for name, runner in [("lockstep", partial(run_episodes, workers=2, concurrency=4)), ("sequential", run_sequential)]:
        envs: list[LineWorld] = []
        crash = Crash(remaining=dict(flaky), on=on)  # failures per task, on its first reset or step
        got = runner(partial(LineWorld, crash=crash, registry=envs), ScriptedPolicy(), specs, GREEDY, history=2)
        assert [t.traj_id for t in got] == [s.key for s in specs]
        for t, c in zip(got, clean):
            if t.traj_id in expected_errors:
                assert t.error and "injected crash" in t.error and not t.success and t.outcome_reward == 0.0
            else:
                assert t == c  # retried episodes restart from scratch with the same seeds
        assert all(e.closed for e in envs) and len(envs) > 2  # failed instances were replaced and closed
        results[name] = got
    assert results["lockstep"] == results["sequential"]


def test_seeds_are_per_episode_and_turn_not_per_batch():
    sampled = SamplingParams(temperature=1.0, max_new_tokens=8)
    specs = _specs(8)
    a = run_episodes(LineWorld, ScriptedPolicy(), specs, sampled, history=1, concurrency=2)
    b = run_episodes(LineWorld, ScriptedPolicy(), specs[::-1], sampled, history=1, concurrency=7)[::-1]
    assert a == b
    assert turn_seed(specs[0], 0) != turn_seed(specs[0], 1) != turn_seed(specs[1], 1)


def test_progress_and_summary_log(caplog):
    with caplog.at_level(logging.INFO, logger="ipr_core.rollout"):
        run_episodes(LineWorld, ScriptedPolicy(), _specs(3), GREEDY, history=2, progress="eval")
    [line] = [r.getMessage() for r in caplog.records if "ep/s" in r.getMessage()]
    assert "generation" in line and "environment" in line


def test_rejects_duplicate_keys_and_runs_empty():
    task = LineWorld().list_tasks("test", 1)[0]
    with pytest.raises(ValueError, match="unique"):
        run_episodes(LineWorld, ScriptedPolicy(), [EpisodeSpec("a", task), EpisodeSpec("a", task)], GREEDY, history=2)
    assert run_episodes(LineWorld, ScriptedPolicy(), [], GREEDY, history=2) == []


def test_mc_specs_run_through_the_runner():
    from ipr_core import ipr
    from ipr_core.types import Trajectory

    env = LineWorld()
    task = env.list_tasks("train", 4)[3]
    instruction, steps = expert_steps(env, task)
    expert = Trajectory("e0", task, "expert", env.system_prompt(), instruction, tuple(steps), 0, steps[-1].reward, True, True)
    specs = ipr.mc_specs(ipr.expert_targets([expert]), n_rollouts=3, run_seed=0)
    rows = ipr.mc_rollout_rows(ipr.run_specs(LineWorld, ScriptedPolicy(), specs, SamplingParams(1.0), history=2))
    assert len(rows) == len(specs) and {r["branch_id"] for r in rows} == {"e0"} and all(r["error"] is None for r in rows)


# --- with a real (tiny) transformers model -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)  # 2 threads on this shared 2-core machine run ~20x slower (contention)
    from fake_env import tiny_model
    from ipr_core.policies.hf import TransformersPolicy

    path = tiny_model(tmp_path_factory.mktemp("tiny"), spread=0.15)
    return TransformersPolicy(path, device="cpu", batch_size=8)


def test_lockstep_equals_sequential_with_tiny_model(tiny_policy):
    specs = _specs(6, max_steps=3)
    for sampling in (GREEDY, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8)):
        ref = run_sequential(partial(LineWorld, max_steps=3), tiny_policy, specs, sampling, history=1)
        got = run_episodes(partial(LineWorld, max_steps=3), tiny_policy, specs, sampling, history=1, concurrency=8)
        assert got == ref


def test_lockstep_equals_sequential_on_babyai(tiny_policy):
    pytest.importorskip("minigrid")
    babyai = pytest.importorskip("ipr_core.envs.babyai")
    from ipr_core.envs.base import make_env

    make = partial(make_env, "babyai", None, 3)
    env = make()
    try:
        tasks = env.list_tasks("test", n=4, seed=0)
    finally:
        env.close()
    specs = [EpisodeSpec(f"b{i}", t, seed=i) for i, t in enumerate(tasks)]
    assert babyai is not None
    for policy in (ScriptedPolicy(), tiny_policy):
        assert run_episodes(make, policy, specs, GREEDY, history=1) == run_sequential(make, policy, specs, GREEDY, history=1)


def test_runs_side_by_side_share_the_process_env_threads():
    """Two concurrent stages with env.workers=3 step their environments on 3
    threads between them, not 6, and each gets the results it gets alone."""
    import threading

    specs = _specs()
    ref = run_sequential(LineWorld, ScriptedPolicy(), specs, GREEDY, history=2)
    seen: set[threading.Thread] = set()  # thread objects: two pools would reuse the same names

    class Recording(LineWorld):
        def step(self, action):
            seen.add(threading.current_thread())
            return super().step(action)

    got: dict[int, list] = {}

    def stage(i: int) -> None:
        got[i] = run_episodes(partial(Recording, step_delay_s=0.002), ScriptedPolicy(), specs, GREEDY, history=2, workers=3, batch_size=8)

    threads = [threading.Thread(target=stage, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] == got[1] == ref
    assert len(seen) <= 3 and all(t.name.startswith("ipr-env") for t in seen), seen
