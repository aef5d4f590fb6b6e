"""TextWorld-Express adapter: exact replay by (game, seed, split), gold experts,
normalised score, invalid commands, limits, splits."""

from __future__ import annotations

import pytest

pytest.importorskip("textworld_express")

from ipr_core.envs.base import replay  # noqa: E402
from ipr_core.envs.twx import TextWorldExpressEnv, text_game_thought  # noqa: E402

SMALL_TWC = "numLocations=1,numItemsToPutAway=2,includeDoors=0,limitInventorySize=0"


@pytest.fixture(scope="module")
def twc():
    env = TextWorldExpressEnv(game="twc", game_params=SMALL_TWC)
    yield env
    env.close()


@pytest.fixture(scope="module")
def coin():
    env = TextWorldExpressEnv(game="coin", game_params="numLocations=4,includeDoors=1,numDistractorItems=0")
    yield env
    env.close()


@pytest.mark.parametrize("fixture", ["twc", "coin"])
def test_expert_prefix_replay_restores_observation_and_score(fixture, request):
    env = request.getfixturevalue(fixture)
    for task in env.list_tasks("train", n=2, seed=3):
        plan = env.expert(task)
        actions = [a for _, a in plan]
        first, results = replay(env, task, actions)
        assert results[-1].info["success"] and results[-1].reward == 1.0
        for t in range(len(actions) + 1):
            again_first, again = replay(env, task, actions[:t])
            assert again_first == first
            if t:
                assert (again[-1].observation, again[-1].reward, again[-1].info["score"]) == (results[t - 1].observation, results[t - 1].reward, results[t - 1].info["score"])


def test_gold_experts_succeed_with_templated_thoughts(twc):
    tasks = twc.list_tasks("test", n=8)
    for task in tasks:
        plan = twc.expert(task)
        assert plan == twc.expert(task)  # deterministic
        _, results = replay(twc, task, [a for _, a in plan])
        assert results[-1].info["success"] and results[-1].done and results[-1].reward == 1.0
        rewards = [r.reward for r in results]
        assert rewards == sorted(rewards)  # twc's score only grows along the gold path
    assert text_game_thought("take green hot pepper") == "I need the green hot pepper, so I take it."
    assert text_game_thought("put olive oil in shelf") == "The olive oil belongs in the shelf, so I put it there."
    assert text_game_thought("chop carrot") == "The recipe needs the carrot chopped, so I chop it."


def test_first_message_is_task_plus_observation(twc):
    task = twc.list_tasks("train", n=1)[0]
    first = twc.reset(task)
    assert first.startswith("Your task is to pick up objects") and "You are in the" in first


def test_invalid_and_malformed_commands(twc):
    task = twc.list_tasks("train", n=1)[0]
    twc.reset(task)
    for k, junk in enumerate(["dance wildly", "", "take the moon", "look\naround please"], start=1):
        r = twc.step(junk)
        assert r.info["invalid"] and r.observation.startswith("Unknown action") and not r.done and r.info["steps"] == k
    assert not twc.step("look around").info["invalid"]


def test_step_limit_ends_episode():
    env = TextWorldExpressEnv(game="twc", game_params=SMALL_TWC, max_steps=3)
    try:
        task = env.list_tasks("train", n=1)[0]
        env.reset(task)
        results = [env.step("inventory") for _ in range(3)]
        assert [r.done for r in results] == [False, False, True]
        assert results[-1].info["truncated"] and not results[-1].info["success"]
    finally:
        env.close()


def test_listing_deterministic_and_splits_disjoint(twc):
    train = twc.list_tasks("train", n=50, seed=0)
    assert twc.list_tasks("train", n=50, seed=0) == train
    assert twc.list_tasks("train", n=10, seed=0) == train[:10]
    test = twc.list_tasks("test")
    dev = twc.list_tasks("dev")
    all_train = twc.list_tasks("train")
    seeds = lambda ts: {t.seed for t in ts}  # noqa: E731
    assert len(all_train) == 1000 and not seeds(all_train) & seeds(test) and not seeds(dev) & seeds(test)
    assert train[0].task_id.startswith("twc-") and train[0].meta == {"game": "twc", "game_params": SMALL_TWC}
    with pytest.raises(ValueError, match="split"):
        twc.list_tasks("valid")


def test_rejects_unknown_game_and_foreign_tasks(twc):
    with pytest.raises(ValueError, match="unknown TextWorld-Express game"):
        TextWorldExpressEnv(game="zork")
    other = TextWorldExpressEnv(game="coin")
    try:
        task = other.list_tasks("train", n=1)[0]
    finally:
        other.close()
    with pytest.raises(ValueError, match="coin"):
        twc.reset(task)


def test_negative_scores_clip_to_zero():
    # cookingworld: eating an unprepared meal / wrong ingredient can end the game in failure.
    env = TextWorldExpressEnv(game="cookingworld", game_params="numLocations=1,numIngredients=1,numDistractorItems=1,includeDoors=0,limitInventorySize=0")
    try:
        for task in env.list_tasks("train", n=5):
            env.reset(task)
            for cmd in ["take knife", "eat knife", "look around"]:
                r = env.step(cmd)
                assert 0.0 <= r.reward <= 1.0
                if r.done:
                    break
    finally:
        env.close()
