"""ScienceWorld adapter: one shared JVM for the module (a start costs ~1-2 s and
~400-700 MB), a few short deterministic tasks."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("scienceworld")

from ipr_core.envs.base import replay  # noqa: E402
from ipr_core.envs.scienceworld import STOCHASTIC_TASKS, ScienceWorldEnv, canonical_text, parse_menu, science_thought  # noqa: E402

TASKS = ["chemistry-mix-paint-secondary-color", "find-non-living-thing", "lifespan-longest-lived"]


@pytest.fixture(scope="module")
def env():
    e = ScienceWorldEnv(task_names=TASKS)
    yield e
    e.close()


@pytest.fixture(scope="module")
def tasks(env):
    return env.list_tasks("train", n=3, seed=0)  # one variation of each task


def test_expert_prefix_replay_restores_observation_and_score(env, tasks):
    for task in tasks[:2]:
        actions = [a for _, a in env.expert(task)]
        first, results = replay(env, task, actions)
        assert results[-1].info["success"] and results[-1].reward == 1.0
        actions = actions[: len(results)]  # gold paths may go on after success (a last "wait")
        for t in range(len(actions) + 1):
            again_first, again = replay(env, task, actions[:t])
            assert again_first == first
            if t:
                assert (again[-1].observation, again[-1].info["score"], again[-1].done) == (results[t - 1].observation, results[t - 1].info["score"], results[t - 1].done)


def test_gold_experts_succeed(env, tasks):
    for task in tasks:
        plan = env.expert(task)
        assert plan and all(th.endswith(".") for th, _ in plan)
        _, results = replay(env, task, [a for _, a in plan])
        assert results[-1].done and results[-1].info["success"] and results[-1].reward == 1.0
        assert all(0.0 <= r.reward <= 1.0 for r in results)
    assert science_thought("focus on green paint") == "The task is about the green paint, so I focus on it."


def test_first_message_is_task_description_plus_room(env, tasks):
    first = env.reset(tasks[0])
    assert first.startswith("Your task is to") and "This room is called" in first
    assert "Task Description" not in first


def test_invalid_malformed_and_failing_actions(env, tasks):
    task = next(t for t in tasks if t.meta["task_name"] == "chemistry-mix-paint-secondary-color")
    env.reset(task)
    for junk in ["dance with the bees", "", "look\naround now"]:
        r = env.step(junk)
        assert r.info["invalid"] and r.observation == "No known action matches that input." and not r.done
    # A wrong focus fails the task: negative score, reward 0, episode over.
    r = env.step("focus on bowl")
    assert r.done and not r.info["success"] and r.info["score"] < 0 and r.reward == 0.0


def test_menus_are_canonical_and_answers_recorded_as_text(env, tasks):
    task = next(t for t in tasks if t.meta["task_name"] == "chemistry-mix-paint-secondary-color")
    seen = []
    for answer in ["1", "look at red paint (in wood cup, in art studio)"]:
        env.reset(task)
        menu = env.step("look at paint")
        assert menu.observation.startswith("Ambiguous request")
        seen.append(menu.observation)
        r = env.step(answer)
        assert not r.info["invalid"] and "inexact" not in r.info
        assert r.info["action"] == "look at red paint (in wood cup, in art studio)" and r.observation == "red paint"
    assert seen[0] == seen[1]  # same numbering after a reload
    # Look-alike options: the text cannot say which one was meant, and says so.
    env.reset(task)
    env.step("look at wood cup")
    assert env.step("2").info["inexact"]


def test_step_limit_ends_episode(env, tasks):
    env.max_steps, saved = 3, env.max_steps
    try:
        env.reset(tasks[0])
        results = [env.step("look around") for _ in range(3)]
    finally:
        env.max_steps = saved
    assert [r.done for r in results] == [False, False, True] and results[-1].info["truncated"]


def test_listing_deterministic_round_robin_and_splits_disjoint(env):
    train = env.list_tasks("train", seed=0)
    assert env.list_tasks("train", seed=0) == train
    assert env.list_tasks("train", n=6, seed=0) == train[:6]
    assert [t.meta["task_name"] for t in train[:3]] == sorted(TASKS)  # round-robin over tasks
    for name in TASKS:
        tr, dv, te = (set(env.variations(name, s)) for s in ("train", "dev", "test"))
        assert tr and dv and te and not (tr & dv) and not (tr & te) and not (dv & te)
    test_ids = {t.task_id for t in env.list_tasks("test")}
    assert not test_ids & {t.task_id for t in train}
    with pytest.raises(ValueError, match="requested"):
        env.list_tasks("dev", n=10_000)


def test_jvm_heap_is_capped(env, tasks):
    env.reset(tasks[0])
    cmdline = Path(f"/proc/{env.pid}/cmdline").read_bytes().split(b"\0")
    assert b"-Xmx768m" in cmdline


def test_options_validate_and_default_leaves_out_stochastic_tasks():
    with pytest.raises(ValueError, match="unknown ScienceWorld tasks"):
        ScienceWorldEnv(task_names=["boil-everything"])
    default = ScienceWorldEnv()  # no JVM until first use
    assert not STOCHASTIC_TASKS & set(default.task_names) and len(default.task_names) == 30 - len(STOCHASTIC_TASKS)
    assert ScienceWorldEnv(task_names="boil,melt").task_names == ("boil", "melt")
    default.close()


def test_canonical_text_sorts_listings_but_keeps_sentences():
    a = "This room is called the kitchen. In it, you see: \n\tthe agent\n\ta table. On the table is: a cup (containing water, salt), a bowl.\nYou also see:\n\tA door to the hallway"
    b = "This room is called the kitchen. In it, you see: \n\ta table. On the table is: a bowl, a cup (containing salt, water).\n\tthe agent\nYou also see:\n\tA door to the hallway"
    assert canonical_text(a) == canonical_text(b)
    assert canonical_text("You move the apple seed to the flower pot 3.") == "You move the apple seed to the flower pot 3."
    menu = "Ambiguous request: Please enter the number for the action you intended (or blank to cancel):\n0:\tlook at b\n1:\tlook at a"
    assert parse_menu(menu) == [("look at a", 1), ("look at b", 0)]
    assert parse_menu("You see a cup.") is None


def test_killed_jvm_raises_env_error_and_reset_restarts_it(env, tasks):
    # Last in the module: it costs a JVM restart.
    import os
    import signal

    from ipr_core.envs.base import EnvError

    env.reset(tasks[1])
    pid = env.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(EnvError):
        for _ in range(3):  # the kill may land a moment later
            env.step("look around")
    first = env.reset(tasks[1])
    assert env.pid != pid and "This room is called" in first
    assert not env.step("look around").info["invalid"]
