import pyarrow as pa
import pytest

from helpers import pair_row, traj
from ipr_core.schemas import SCHEMAS, SchemaError, conform, from_rows
from ipr_core.types import Task, Trajectory

SAMPLE_ROWS = {
    "tasks": [Task("t1", "babyai", "train", 3, {"level": "GoToObj"}).to_row()],
    "trajectories": [traj().to_row()],
    "branches": [{**traj(source="agent").to_row(), "branch_id": "b1", "expert_traj_id": "expert-t0", "iteration": 1}],
    "mc_rollouts": [{"branch_id": "b1", "task_id": "t0", "step": 1, "rollout": 0, "seed": 5, "outcome_reward": 0.5, "n_steps": 3, "error": None}],
    "mc_memo": [{"key": "k1", "action_key": "a1", "rollout": 0, "seed": 5, "outcome_reward": 0.5, "n_steps": 3, "error": None, "task_id": "t0", "step": 1, "branch_id": "b1"}],
    "step_rewards": [{"branch_id": "b1", "task_id": "t0", "step": 1, "reward": 0.4, "n_rollouts": 5, "is_last": False}],
    "pairs": [pair_row()],
    "sft": [{"messages": [{"role": "user", "content": "x"}], "task_id": "t0", "traj_id": "e0"}],
    "eval": [{"task_id": "t0", "model": "sft", "iteration": 0, "outcome_reward": 1.0, "success": True, "n_steps": 4, "error": None}],
    "metrics": [{"name": "loss", "value": 0.5, "step": 1}],
    "audit": [{"branch_id": "it01|e0|j1", "task_id": "t0", "step": 2, "expert_estimate": 0.6, "agent_estimate": 0.2, "expert_reference": 0.7, "agent_reference": 0.4, "n": 3, "n_reference": 32}],
}


def test_every_kind_has_a_sample():
    assert set(SAMPLE_ROWS) == set(SCHEMAS)


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_round_trip(kind):
    table = from_rows(SAMPLE_ROWS[kind], kind)
    assert table.schema.equals(SCHEMAS[kind].schema)
    assert table.to_pylist() == SAMPLE_ROWS[kind]


def test_trajectory_record_round_trip():
    t = traj(n=4, reward=0.7)
    back = Trajectory.from_row(from_rows([t.to_row()], "trajectories").to_pylist()[0])
    assert back.steps == t.steps and back.outcome_reward == 0.7 and back.task.task_id == t.task.task_id


def test_missing_and_extra_columns_are_named():
    t = from_rows(SAMPLE_ROWS["pairs"], "pairs")
    with pytest.raises(SchemaError, match=r"f.parquet.*missing column\(s\) \['kind'\]"):
        conform(t.drop_columns(["kind"]), "pairs", "f.parquet")
    with pytest.raises(SchemaError, match="unexpected column"):
        conform(t.append_column("zzz", pa.array([1])), "pairs", "f.parquet")


def test_wrong_type_and_nulls_are_named():
    t = from_rows(SAMPLE_ROWS["eval"], "eval")
    bad = t.set_column(t.schema.get_field_index("success"), "success", pa.array(["yes"]))
    with pytest.raises(SchemaError, match="'success' has type string"):
        conform(bad, "eval", "e.parquet")
    nulls = t.set_column(t.schema.get_field_index("task_id"), "task_id", pa.array([None], pa.string()))
    with pytest.raises(SchemaError, match="'task_id' has 1 null"):
        conform(nulls, "eval", "e.parquet")


def test_unknown_kind():
    with pytest.raises(SchemaError, match="unknown artifact kind"):
        from_rows([], "nope")


def test_rows_with_wrong_keys():
    with pytest.raises(SchemaError, match="row 0 of metrics: missing \\['step'\\]"):
        from_rows([{"name": "x", "value": 1.0}], "metrics")


def test_trajectory_keeps_task_seed_and_meta_apart_from_episode_seed():
    t = Trajectory("b1", Task("t9", "babyai", "train", 123, {"level": "L"}), "agent", "s", "i", (), 0, 0.0, False, True, seed=999)
    back = Trajectory.from_row(from_rows([t.to_row()], "trajectories").to_pylist()[0])
    assert back.task == t.task and back.seed == 999
