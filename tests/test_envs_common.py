"""What every adapter shares: the protocol, the registry, the ReAct parser on
realistic model outputs, the environment pool, and JVM crash handling."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from ipr_core.envs.base import Environment, EnvError, StepResult, env_factory, make_env, replay
from ipr_core.envs.pool import EnvPool
from ipr_core.types import MalformedAction, Task, parse_react


# --- the protocol ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def babyai():
    pytest.importorskip("minigrid")
    env = make_env("babyai", {"level": "BabyAI-GoToObj-v0"})
    yield env
    env.close()


@pytest.fixture(scope="module")
def twx():
    pytest.importorskip("textworld_express")
    env = make_env("textworld_express", {"game": "twc", "game_params": "numLocations=1,numItemsToPutAway=1,includeDoors=0,limitInventorySize=0"})
    yield env
    env.close()


@pytest.mark.parametrize("fixture", ["babyai", "twx"])
def test_adapters_implement_the_protocol(fixture, request):
    env = request.getfixturevalue(fixture)
    assert isinstance(env, Environment)
    assert isinstance(env.name, str) and env.max_steps >= 1
    task = env.list_tasks("train", n=2, seed=0)[0]
    assert isinstance(task, Task) and task.env == env.name and task.split == "train"
    first = env.reset(task)
    assert isinstance(first, str) and first.strip()
    plan = env.expert(task)
    assert plan and all(isinstance(t, str) and isinstance(a, str) and a for t, a in plan)
    env.reset(task)
    r = env.step(plan[0][1])
    assert isinstance(r, StepResult) and 0.0 <= r.reward <= 1.0
    assert {"success", "invalid", "truncated"} <= set(r.info)
    assert "Valid actions" in env.system_prompt() or "Action:" in env.system_prompt()


@pytest.mark.parametrize("fixture", ["babyai", "twx"])
def test_step_before_reset_or_after_done_fails_loudly(fixture, request):
    env = request.getfixturevalue(fixture)
    task = env.list_tasks("train", n=1)[0]
    plan = env.expert(task)  # leaves the environment without a running episode
    with pytest.raises(RuntimeError, match="reset"):
        env.step(plan[0][1])
    _, results = replay(env, task, [a for _, a in plan])
    assert results[-1].done
    with pytest.raises(RuntimeError, match="reset"):
        env.step(plan[0][1])


def test_registry_resolves_every_bundled_adapter_lazily():
    for name, module in [("babyai", "minigrid"), ("textworld_express", "textworld_express"), ("scienceworld", "scienceworld")]:
        pytest.importorskip(module)
        cls = env_factory(name)
        assert cls.name == name


def test_make_env_passes_options_and_max_steps(babyai):
    env = make_env("babyai", {"level": "BabyAI-GoToRedBallNoDists-v0"}, max_steps=7)
    assert env.max_steps == 7 and env.level == "BabyAI-GoToRedBallNoDists-v0"
    with pytest.raises(TypeError):
        make_env("babyai", {"no_such_option": 1})


# --- the ReAct parser on what models really write ---------------------------------------


@pytest.mark.parametrize(
    "text, thought, action",
    [
        ("Thought: The red ball is 2 steps ahead, so I move forward.\nAction: move forward", "The red ball is 2 steps ahead, so I move forward.", "move forward"),
        ("  thought: I need the coin.\n\nACTION:   take coin  \n", "I need the coin.", "take coin"),
        ("Action: turn left", "", "turn left"),
        # Models keep going after the action: only its first line counts.
        ("Thought: go\nAction: move forward\nObservation: You see: a wall 1 step forward.\nThought: turn", "go", "move forward"),
        ("Thought: I pick the first option.\nAction: 0", "I pick the first option.", "0"),
        ("Thought: Focus on the substance.\nAction: focus on unknown substance B in inventory<|im_end|>", "Focus on the substance.", "focus on unknown substance B in inventory<|im_end|>"),
        ("Thought: The cupboard holds it. Action: open it?\nAction: open kitchen cupboard", "The cupboard holds it. Action: open it?", "open kitchen cupboard"),
    ],
)
def test_parse_react_realistic_outputs(text, thought, action):
    assert parse_react(text) == (thought, action)


@pytest.mark.parametrize("text", ["Thought: I am not sure what to do", "", "Thought: x\nAction:   ", "move forward"])
def test_parse_react_rejects_outputs_without_an_action(text):
    with pytest.raises(MalformedAction):
        parse_react(text)


def test_malformed_model_output_reaches_the_env_as_an_invalid_action(babyai):
    # Whatever a runner forwards for unparseable output, the env must not crash.
    task = babyai.list_tasks("train", n=1)[0]
    babyai.reset(task)
    for junk in ["", "Thought: hmm", "move forward\nturn left", "<|im_end|>", "x" * 500]:
        r = babyai.step(junk)
        assert r.info["invalid"] and "Invalid action" in r.observation


# --- the pool -------------------------------------------------------------------------


class _FakeEnv:
    name = "fake"
    max_steps = 3
    built = 0

    def __init__(self):
        type(self).built += 1
        self.closed = False

    def list_tasks(self, split, n=None, seed=0):
        return [Task("t", "fake", split, 0)]

    def system_prompt(self):
        return "sys"

    def reset(self, task):
        return "start"

    def step(self, action):
        if action == "crash":
            raise EnvError("boom")
        return StepResult("ok", 0.0, False, {"success": False, "invalid": False})

    def expert(self, task):
        return None

    def close(self):
        self.closed = True


def test_pool_reuses_instances_and_replaces_crashed_ones():
    _FakeEnv.built = 0
    with EnvPool(_FakeEnv, size=2) as pool:
        with pool.lease() as a:
            a.step("x")
        with pool.lease() as b:
            assert b is a  # reused, not rebuilt
        with pytest.raises(EnvError):
            with pool.lease() as c:
                c.step("crash")
        assert c.closed and c not in pool.instances()
        with pool.lease() as d:
            assert d is not c
        assert _FakeEnv.built == 2
    assert d.closed


def test_pool_bounds_concurrent_instances():
    _FakeEnv.built = 0
    pool = EnvPool(_FakeEnv, size=2)
    seen = []

    def work():
        for _ in range(20):
            with pool.lease() as env:
                seen.append(id(env))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _FakeEnv.built <= 2 and len(set(seen)) <= 2
    pool.close()
    with pytest.raises(RuntimeError, match="closed"):
        with pool.lease():
            pass


# --- a crashed JVM ----------------------------------------------------------------------


def test_killed_jvm_raises_env_error_and_reset_restarts_it():
    pytest.importorskip("textworld_express")
    env = make_env("textworld_express", {"game": "arithmetic"})
    try:
        task = env.list_tasks("train", n=1)[0]
        env.reset(task)
        pid = env.pid
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(EnvError):
            for _ in range(3):  # the kill may land a moment later
                env.step("look around")
        first = env.reset(task)  # heals: a fresh JVM
        assert env.pid != pid and "math problem" in first
        assert not env.step("look around").info["invalid"]
    finally:
        env.close()


def test_failed_method_lookup_on_a_dead_jvm_is_an_env_error():
    # py4j's auto_field asks the JVM whether a name is a field before calling it,
    # so on a dead JVM the lookup itself raises; that must be an EnvError too.
    from py4j.protocol import Py4JNetworkError

    from ipr_core.envs.pool import JavaServer, JVMBackedEnv

    class _Proc:
        pid, returncode = 4242, None

        def poll(self):
            return None  # not reaped yet: the kill has not been noticed

    class _DeadApi:
        def __getattr__(self, name):
            raise Py4JNetworkError("Answer from Java side is empty")

    server = JavaServer.__new__(JavaServer)
    server._proc, server._broken, server.jar = _Proc(), False, "sim.jar"
    env = JVMBackedEnv()
    env._server, env._api = server, _DeadApi()
    with pytest.raises(EnvError, match="Py4JNetworkError"):
        env._call("stepJSON", "look around")
    assert not server.alive()


def test_parse_react_empty_action_line_is_malformed():
    from ipr_core.types import MalformedAction, parse_react

    with pytest.raises(MalformedAction):
        parse_react("Action:   \nThought: x")
    assert parse_react("Thought: go\nAction: move forward\nObservation: x") == ("go", "move forward")
