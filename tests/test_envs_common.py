"""What every adapter shares: the protocol, the registry and its typed options
(checked before anything is built), the ReAct parser on realistic model
outputs, the environment pool, and JVM crash handling."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from pydantic import ValidationError

from ipr_core.config import ConfigError
from ipr_core.envs.babyai import BabyAIOptions
from ipr_core.envs.base import Environment, EnvError, StepResult, env_factory, make_env, replay
from ipr_core.envs.pool import EnvPool
from ipr_core.envs.registry import EnvOptions, available_envs, env_options, options_model, register_env, validate_env
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
    assert env.options == BabyAIOptions(level="BabyAI-GoToRedBallNoDists-v0", max_steps=7)
    with pytest.raises(ConfigError, match="no option 'no_such_option'"):
        make_env("babyai", {"no_such_option": 1})


# --- typed options, checked before anything runs ----------------------------------------------

ADAPTERS = ["alfworld", "babyai", "intercode_sql", "scienceworld", "textworld_express"]


@pytest.fixture(autouse=True)
def alfworld_data(tmp_path, monkeypatch):
    """An (empty) ALFWorld data folder in $ALFWORLD_DATA: the adapter's defaults need games to point at."""
    (tmp_path / "alfworld" / "json_2.1.1" / "train").mkdir(parents=True)
    monkeypatch.setenv("ALFWORLD_DATA", str(tmp_path / "alfworld"))
    return tmp_path / "alfworld"


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Fail any attempt to construct an adapter, start a JVM or open a database."""
    import ipr_core.envs.intercode_sql as ic
    import ipr_core.envs.pool as pool
    from ipr_core.envs.registry import env_factory

    def refuse(*a, **k):
        raise AssertionError("validation must not build anything")

    for name in ADAPTERS:
        monkeypatch.setattr(env_factory(name), "__init__", refuse)
    monkeypatch.setattr(pool.JavaServer, "__init__", refuse)
    monkeypatch.setattr(ic, "parse_dump", refuse)


def test_every_adapter_declares_a_frozen_options_model_that_forbids_extra_keys():
    assert available_envs() == ADAPTERS
    for name in ADAPTERS:
        model = options_model(name)
        assert issubclass(model, EnvOptions) and model.model_config["frozen"] and model.model_config["extra"] == "forbid"
        assert "max_steps" in model.model_fields
        assert env_factory(name).Options is model  # the adapter validates with the model the registry declares
        opts = env_options(name)
        assert isinstance(opts, model) and opts == model()  # the defaults validate
        with pytest.raises(ValidationError):
            opts.max_steps = 3  # frozen


def test_unknown_environment_names_the_valid_ones(nothing_is_built):
    for call in (validate_env, env_options, make_env, env_factory):
        with pytest.raises(ConfigError) as e:
            call("babyia")
        assert isinstance(e.value, ValueError)
        assert str(e.value) == "unknown environment 'babyia' (did you mean 'babyai'?); valid names: alfworld, babyai, intercode_sql, scienceworld, textworld_express"


@pytest.mark.parametrize(
    "name, valid",
    [
        ("alfworld", "data, expert, in_context_example, max_steps, shelf_games, task_types"),
        ("babyai", "actions, level, max_steps"),
        ("textworld_express", "game, game_params, heap, max_steps"),
        ("scienceworld", "heap, include_stochastic, max_steps, simplification, task_names, valid_actions"),
        (
            "intercode_sql",
            "backend, cache_dir, dump_path, hardness, max_cell_bytes, max_columns, max_result_bytes, max_rows, max_steps, mysql_url, obs_limit, readonly_password, readonly_user, "
            "split_by, split_seed, statement_timeout_s, tables_in_prompt, task_file, test_size",
        ),
    ],
)
def test_unknown_option_key_names_adapter_key_and_valid_keys(name, valid, nothing_is_built):
    with pytest.raises(ConfigError) as e:
        validate_env(name, {"max_step": 5})
    assert str(e.value) == f"environment {name!r} has no option 'max_step' (did you mean 'max_steps'?); valid options: {valid}"
    with pytest.raises(ConfigError, match=f"environment '{name}' has no options 'colour', 'xyz'; valid options: "):
        make_env(name, {"colour": "red", "xyz": 3})


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("babyai", {"level": "BabyAI-GoToObjj-v0"}, "environment 'babyai', option 'level': unknown BabyAI level 'BabyAI-GoToObjj-v0' (did you mean 'BabyAI-GoToObj-v0'?); choose from ['BabyAI-ActionObjDoor-v0', "),
        ("babyai", {"actions": ["fly"]}, "environment 'babyai', option 'actions': unknown BabyAI actions ['fly']; choose from ['turn left', 'turn right', 'move forward', 'pick up', 'drop', 'toggle']"),
        ("babyai", {"max_steps": 0}, "environment 'babyai', option 'max_steps': Input should be greater than or equal to 1 (got 0)"),
        ("babyai", {"max_steps": "many"}, "environment 'babyai', option 'max_steps': Input should be a valid integer, unable to parse string as an integer (got \"many\")"),
        ("alfworld", {"task_types": "pick_and_place,pick_two_obj_and_place"}, "environment 'alfworld', option 'task_types': unknown ALFWorld task types ['pick_and_place']; choose from ['pick_and_place_simple', "),
        ("alfworld", {"data": "/nonexistent/games"}, "environment 'alfworld': option 'data': no ALFWorld split folders (train, valid_seen, valid_unseen) under /nonexistent/games; expected the official layout"),
        ("textworld_express", {"game": "zork"}, "environment 'textworld_express', option 'game': unknown TextWorld-Express game 'zork'; choose from ['cookingworld', 'twc', 'coin', "),
        ("textworld_express", {"heap": "2 GB"}, "environment 'textworld_express', option 'heap': heap must be a JVM size such as 256m or 2g (-Xmx; '' for no cap), got '2 GB'"),
        ("scienceworld", {"task_names": "boil,boil-everything"}, "environment 'scienceworld', option 'task_names': unknown ScienceWorld tasks ['boil-everything']; choose from ["),
        ("scienceworld", {"valid_actions": "sometimes"}, "environment 'scienceworld', option 'valid_actions': Input should be a valid boolean, unable to interpret input (got \"sometimes\")"),
        ("intercode_sql", {"hardness": "trivial"}, "environment 'intercode_sql', option 'hardness': unknown hardness ['trivial']; choose from ['easy', 'medium', 'hard', 'extra']"),
        ("intercode_sql", {"backend": "postgres"}, "environment 'intercode_sql', option 'backend': Input should be 'sqlite' or 'mysql' (got \"postgres\")"),
        ("intercode_sql", {"split_by": "table"}, "environment 'intercode_sql', option 'split_by': Input should be 'question' or 'database' (got \"table\")"),
        ("intercode_sql", {"statement_timeout_s": 0}, "environment 'intercode_sql', option 'statement_timeout_s': Input should be greater than 0 (got 0)"),
        ("intercode_sql", {"test_size": 1.5}, "environment 'intercode_sql', option 'test_size': a fractional test_size must be in (0, 1), got 1.5"),
        ("intercode_sql", {"mysql_url": "postgres://me:s3cret@db:5432"}, "environment 'intercode_sql', option 'mysql_url': mysql_url must start with mysql:// or mariadb://, got 'db:5432'"),
    ],
)
def test_bad_option_values_say_why_and_what_is_valid(name, options, message, nothing_is_built):
    if name == "babyai" and "level" in options:
        pytest.importorskip("minigrid")
    if name == "scienceworld":
        pytest.importorskip("scienceworld")
    with pytest.raises(ConfigError) as e:
        validate_env(name, options)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value) and "s3cret" not in str(e.value)  # one line for the CLI, no password


def test_max_steps_is_validated_with_the_options(nothing_is_built):
    assert env_options("babyai", {"level": "BabyAI-GoToLocal-v0"}, max_steps=9) == BabyAIOptions(level="BabyAI-GoToLocal-v0", max_steps=9)
    with pytest.raises(ConfigError, match="option 'max_steps': Input should be greater than or equal to 1"):
        validate_env("babyai", None, max_steps=0)


def test_options_normalise_what_configs_and_the_cli_write(nothing_is_built):
    pytest.importorskip("scienceworld")
    assert env_options("scienceworld", {"task_names": "boil,melt"}).task_names == ("boil", "melt")
    assert env_options("intercode_sql", {"hardness": "extra", "test_size": 0.1}).hardness == ("extra",)
    assert env_options("textworld_express", {"game": "coin", "heap": ""}).heap == ""


def test_directly_built_adapters_check_options_the_same_way(babyai):
    from ipr_core.envs.babyai import BabyAIEnv

    with pytest.raises(ConfigError, match="environment 'babyai' has no option 'lvl'"):
        BabyAIEnv(lvl="BabyAI-GoToObj-v0")
    env = BabyAIEnv(BabyAIOptions(level="BabyAI-GoToRedBallNoDists-v0"), max_steps=5)
    assert (env.level, env.max_steps, env.options.max_steps) == ("BabyAI-GoToRedBallNoDists-v0", 5, 5)
    env.close()


def test_adapters_registered_without_a_model_get_their_options_unchecked():
    from fake_env import LineWorld

    register_env("lineworld_unchecked", LineWorld, replace=True)
    try:
        assert options_model("lineworld_unchecked") is None
        assert env_options("lineworld_unchecked", {"step_delay_s": 0.0}, max_steps=3) == {"step_delay_s": 0.0, "max_steps": 3}
        assert make_env("lineworld_unchecked", None, max_steps=3).max_steps == 3
    finally:
        from ipr_core.envs import registry

        registry._REGISTRY.pop("lineworld_unchecked")


def test_the_cli_prints_an_option_error_as_one_line(capsys, nothing_is_built):
    from ipr_cli.main import main

    assert main(["data", "tasks", "--env", "babyai", "--n", "1", "--option", "levle=BabyAI-GoToObj-v0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "ipr: error: environment 'babyai' has no option 'levle' (did you mean 'level'?); valid options: actions, level, max_steps"


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
