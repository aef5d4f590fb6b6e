"""BabyAI adapter: exact replay, the bot as expert, text views, limits, splits."""

from __future__ import annotations

import pytest

pytest.importorskip("minigrid")

from ipr_core.envs.babyai import BabyAIEnv, describe_view  # noqa: E402
from ipr_core.envs.base import make_env, replay  # noqa: E402
from ipr_core.types import Task, format_react, parse_react  # noqa: E402

LEVELS = ["BabyAI-GoToRedBallNoDists-v0", "BabyAI-GoToObj-v0", "BabyAI-GoToLocalS8N2-v0", "BabyAI-GoToLocal-v0"]


@pytest.fixture(scope="module")
def envs():
    made = {level: BabyAIEnv(level=level) for level in LEVELS}
    yield made
    for env in made.values():
        env.close()


@pytest.mark.parametrize("level", LEVELS)
def test_expert_prefix_replay_restores_observation_and_reward(envs, level):
    env = envs[level]
    for task in env.list_tasks("train", n=3, seed=1):
        plan = env.expert(task)
        first, results = replay(env, task, [a for _, a in plan])
        assert results[-1].done and results[-1].info["success"]
        for t in range(len(plan) + 1):
            again_first, again = replay(env, task, [a for _, a in plan[:t]])
            assert again_first == first
            if t:
                assert again[-1].observation == results[t - 1].observation
                assert again[-1].reward == results[t - 1].reward
                assert again[-1].done == results[t - 1].done


@pytest.mark.parametrize("level", LEVELS)
def test_expert_reaches_babyai_reward(envs, level):
    env = envs[level]
    for task in env.list_tasks("test", n=10):
        plan = env.expert(task)
        _, results = replay(env, task, [a for _, a in plan])
        last = results[-1]
        assert last.info["success"] and last.done and not last.info["truncated"]
        # BabyAI's own reward with the episode limit as max_steps.
        assert last.reward == pytest.approx(1 - 0.9 * len(plan) / env.max_steps)
        assert all(r.reward == 0.0 for r in results[:-1])


def test_expert_is_deterministic_with_templated_thoughts(envs):
    env = envs["BabyAI-GoToLocalS8N2-v0"]
    tasks = env.list_tasks("train", n=5)
    a = [env.expert(t) for t in tasks]
    b = [env.expert(t) for t in reversed(tasks)][::-1]
    assert a == b
    thoughts = [th for plan in a for th, _ in plan]
    assert all(th.endswith(".") and len(th.split()) <= 25 for th in thoughts)
    assert any("steps ahead" in th or "to the" in th for th in thoughts)
    for plan in a:
        for thought, action in plan:
            assert parse_react(format_react(thought, action)) == (thought, action)


def test_first_message_has_mission_and_compact_view(envs):
    env = envs["BabyAI-GoToObj-v0"]
    task = env.list_tasks("train", n=1)[0]
    first = env.reset(task)
    mission, view = first.split("\n")
    assert mission == f"Your mission: {task.meta['mission']}."
    assert view.startswith("You see: ") and view.endswith(".")
    assert len(first.split()) <= 60
    assert "turn left, turn right, move forward" in env.system_prompt()
    assert "pick up" not in env.system_prompt()  # navigation levels keep three actions


def test_view_describes_objects_egocentrically():
    env = BabyAIEnv(level="BabyAI-GoToRedBallNoDists-v0")
    task = env.list_tasks("train", n=1)[0]
    env.reset(task)
    before = describe_view(env._env, with_inventory=False)
    env.step("turn left")
    env.step("turn right")
    assert describe_view(env._env, with_inventory=False) == before  # turning back restores the view
    env.close()


def test_pickup_levels_get_the_full_action_set_and_inventory():
    env = BabyAIEnv(level="BabyAI-PickupLoc-v0")
    assert "pick up" in env.actions and "toggle" in env.actions
    task = env.list_tasks("train", n=1)[0]
    assert env.reset(task).split("\n")[1].startswith("You carry nothing. You see:")
    plan = env.expert(task)
    assert plan[-1][1] == "pick up" and "pick it up" in plan[-1][0]
    _, results = replay(env, task, [a for _, a in plan])
    assert results[-1].info["success"]
    env.close()


def test_invalid_and_malformed_actions_cost_a_step_and_change_nothing(envs):
    env = envs["BabyAI-GoToObj-v0"]
    task = env.list_tasks("train", n=1)[0]
    first = env.reset(task)
    view = first.split("\n")[1]
    for k, junk in enumerate(["jump", "pick up", "", "Thought: move forward", "turn  left  please"], start=1):
        r = env.step(junk)
        assert r.info["invalid"] and not r.done and r.reward == 0.0 and r.info["steps"] == k
        assert r.observation.startswith("Invalid action") and r.observation.endswith(view)
    # Case, spacing and a final period are forgiven: models write "Move forward."
    assert not env.step(" Move  Forward.").info["invalid"]


def test_step_limit_ends_episode_as_truncated():
    env = make_env("babyai", {"level": "BabyAI-GoToObj-v0"}, max_steps=4)
    task = env.list_tasks("train", n=1)[0]
    env.reset(task)
    results = [env.step("turn left") for _ in range(4)]
    assert [r.done for r in results] == [False, False, False, True]
    assert results[-1].info["truncated"] and not results[-1].info["success"] and results[-1].reward == 0.0
    env.close()


def test_listing_is_deterministic_prefix_stable_and_splits_disjoint(envs):
    env = envs["BabyAI-GoToRedBallNoDists-v0"]  # few distinct layouts: the hard case for disjointness
    train = env.list_tasks("train", n=300, seed=0)
    assert env.list_tasks("train", n=300, seed=0) == train
    assert env.list_tasks("train", n=40, seed=0) == train[:40]
    assert env.list_tasks("train", n=40, seed=1) != train[:40]
    test = env.list_tasks("test", n=60, seed=0) + env.list_tasks("test", n=60, seed=1)
    dev = env.list_tasks("dev", n=60, seed=0)
    ids = lambda ts: {t.task_id for t in ts}  # noqa: E731  (the id is the layout's digest)
    assert len(ids(train)) == 300
    assert not ids(train) & ids(test) and not ids(train) & ids(dev) and not ids(dev) & ids(test)
    assert all(t.split == "test" and t.env == "babyai" and 0 <= t.seed < 2**31 for t in test)
    with pytest.raises(ValueError, match="split"):
        env.list_tasks("validation", n=1)
    with pytest.raises(ValueError, match="pass n"):
        env.list_tasks("train")


def test_reset_rejects_a_task_of_another_level(envs):
    task = envs["BabyAI-GoToObj-v0"].list_tasks("train", n=1)[0]
    with pytest.raises(ValueError, match="level"):
        envs["BabyAI-GoToLocal-v0"].reset(task)
    with pytest.raises(ValueError, match="unknown BabyAI level"):
        BabyAIEnv(level="BabyAI-NoSuchLevel-v0")
    with pytest.raises(ValueError, match="actions"):
        BabyAIEnv(actions=["fly"])


def test_task_round_trips_through_a_row(envs):
    env = envs["BabyAI-GoToObj-v0"]
    task = env.list_tasks("train", n=1)[0]
    again = Task.from_row(task.to_row())
    assert again == task and env.reset(again) == env.reset(task)


def test_levels_outside_the_table_use_their_own_limit_and_toggle():
    env = BabyAIEnv(level="BabyAI-OpenDoor-v0")
    assert env.max_steps > 20 and "toggle" in env.actions
    for task in env.list_tasks("train", n=2):
        plan = env.expert(task)
        _, results = replay(env, task, [a for _, a in plan])
        assert results[-1].info["success"] and plan[-1][1] == "toggle"
    env.close()
