"""Expert trajectory collection, its table, and `ipr data`."""

from __future__ import annotations

import pytest

from ipr_core import store
from ipr_core.conversation import trajectory_messages
from ipr_core.envs.base import EnvError, StepResult, replay
from ipr_core.experts import collect_experts, expert_table, summarize_experts
from ipr_core.types import Task, Trajectory


@pytest.fixture(scope="module")
def babyai():
    pytest.importorskip("minigrid")
    from ipr_core.envs.babyai import BabyAIEnv

    env = BabyAIEnv(level="BabyAI-GoToLocalS8N2-v0")
    yield env
    env.close()


def test_experts_are_replayed_records_of_the_environment(babyai):
    tasks = babyai.list_tasks("train", n=6, seed=4)
    trajs = collect_experts(babyai, tasks, run_seed=4)
    assert [t.task for t in trajs] == tasks
    for traj, task in zip(trajs, tasks):
        assert traj.traj_id == f"expert-{task.task_id}" and traj.source == "expert" and traj.error is None
        assert traj.success and traj.done and traj.seed == task.seed and traj.prefix_len == 0
        assert traj.system == babyai.system_prompt() and traj.instruction == babyai.reset(task)
        assert traj.outcome_reward == traj.steps[-1].reward > 0
        first, results = replay(babyai, task, traj.actions)
        assert first == traj.instruction and [r.observation for r in results] == [s.observation for s in traj.steps]
        msgs = trajectory_messages(traj.system, traj.instruction, traj.steps)
        assert [m["role"] for m in msgs[:4]] == ["system", "user", "assistant", "user"]


def test_expert_collection_shows_a_progress_bar_when_named(babyai, capsys):
    """ALFWorld's experts take seconds a game: the stage shows how far it is."""
    tasks = babyai.list_tasks("train", n=3, seed=4)
    collect_experts(babyai, tasks)
    assert "ep" not in capsys.readouterr().err
    collect_experts(babyai, tasks, progress="experts/train")
    err = capsys.readouterr().err
    assert "experts/train:" in err and "/3 [" in err


def test_experts_are_deterministic(babyai):
    tasks = babyai.list_tasks("train", n=5, seed=9)
    assert collect_experts(babyai, tasks, run_seed=9) == collect_experts(babyai, tasks, run_seed=9)


def test_table_summary_and_duplicate_ids(babyai):
    tasks = babyai.list_tasks("train", n=3)
    trajs = collect_experts(babyai, tasks + tasks[:1])
    assert trajs[3].traj_id == f"expert-{tasks[0].task_id}-1"
    table = expert_table(trajs)
    assert table.num_rows == 4 and table.column("source").to_pylist() == ["expert"] * 4
    back = [Trajectory.from_row(r) for r in table.to_pylist()]
    assert [b.steps for b in back] == [t.steps for t in trajs]
    s = summarize_experts(trajs)
    assert (s.n, s.successes, s.errors) == (4, 4, 0) and s.success_rate == 1.0
    assert s.mean_reward == pytest.approx(sum(t.outcome_reward for t in trajs) / 4)


class _Flaky:
    """A fake environment: crashes once per task on demand, has no expert for 'none'."""

    name = "flaky"
    max_steps = 5

    def __init__(self, crash_times: int = 1):
        self.crash_times = crash_times
        self.crashes = 0

    def list_tasks(self, split, n=None, seed=0):
        return [Task(f"t{i}", "flaky", split, i) for i in range(n or 3)]

    def system_prompt(self):
        return "sys"

    def reset(self, task):
        self.task = task
        return f"start {task.task_id}"

    def step(self, action):
        if self.task.task_id == "crash" and self.crashes < self.crash_times:
            self.crashes += 1
            raise EnvError("JVM died")
        if action == "bug":
            raise KeyError("adapter bug")
        return StepResult(f"after {action}", 1.0, True, {"success": True, "invalid": False})

    def expert(self, task):
        return None if task.task_id == "none" else [("go", "bug" if task.task_id == "bug" else "win")]

    def close(self):
        pass


def test_failures_become_error_rows_never_dropped():
    tasks = [Task(i, "flaky", "train", 0) for i in ("ok", "crash", "none", "bug")]
    trajs = collect_experts(_Flaky(crash_times=1), tasks)
    by = {t.task.task_id: t for t in trajs}
    assert by["ok"].success and by["ok"].error is None
    assert by["crash"].success and by["crash"].error is None  # transient: retried once
    assert by["none"].error.startswith("LookupError") and not by["none"].success and by["none"].steps == ()
    assert by["bug"].error.startswith("KeyError")
    trajs = collect_experts(_Flaky(crash_times=5), [Task("crash", "flaky", "train", 0)])
    assert trajs[0].error == "EnvError: JVM died"
    assert summarize_experts(trajs).errors == 1
    expert_table(trajs)  # error rows fit the schema


def test_cli_builds_expert_dataset(tmp_path, capsys):
    pytest.importorskip("minigrid")
    from ipr_cli.main import main

    out = tmp_path / "experts"
    rc = main(["data", "experts", "--env", "babyai", "--option", "level=BabyAI-GoToRedBallNoDists-v0", "--n", "8", "--seed", "2", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "8/8 experts succeeded" in printed
    rows = store.read_rows(str(out), "trajectories")
    assert len(rows) == 8 and all(r["success"] for r in rows)
    m = store.read_manifest(str(out))
    assert m.meta["env"] == "babyai" and m.meta["options"] == {"level": "BabyAI-GoToRedBallNoDists-v0"}

    rc = main(["data", "tasks", "--env", "babyai", "--split", "test", "--n", "3", "--out", str(tmp_path / "tasks")])
    assert rc == 0 and len(capsys.readouterr().out.strip().splitlines()) == 4
    assert store.read_dataset(str(tmp_path / "tasks"), "tasks").num_rows == 3


def test_cli_reports_bad_options(capsys):
    from ipr_cli.main import main

    assert main(["data", "tasks", "--env", "babyai", "--n", "1", "--option", "nonsense"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["data", "tasks", "--env", "no-such-env", "--n", "1"]) == 2
    with pytest.raises(SystemExit):
        main(["data", "experts", "--help"])
    assert "--option" in capsys.readouterr().out
