"""Arrow schemas of every artifact kind, with a version each.

A dataset's manifest records ``kind`` and ``version``; readers refuse a version
they do not know and tables whose columns or types do not match, naming the
file and the field. Bump a version whenever a schema changes incompatibly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

# One ReAct step: the assistant's thought and action, then the environment's
# observation and the outcome reward the episode would have if it ended here.
STEP = pa.struct(
    [
        ("thought", pa.string()),
        ("action", pa.string()),
        ("observation", pa.string()),
        ("reward", pa.float64()),
    ]
)
STEPS = pa.list_(STEP)


class SchemaError(ValueError):
    """A table does not match its artifact schema; the message names file and field."""


@dataclass(frozen=True)
class ArtifactSchema:
    kind: str
    version: int
    schema: pa.Schema
    description: str


def _s(*fields: tuple[str, pa.DataType, bool]) -> pa.Schema:
    return pa.schema([pa.field(n, t, nullable=nullable) for n, t, nullable in fields])


_TRAJ_FIELDS = (
    ("traj_id", pa.string(), False),
    ("task_id", pa.string(), False),
    ("env", pa.string(), False),
    ("split", pa.string(), False),
    ("source", pa.string(), False),  # expert | agent | scorer | eval
    ("system", pa.string(), False),
    ("instruction", pa.string(), False),  # first user message: task + initial observation
    ("steps", STEPS, False),
    ("prefix_len", pa.int32(), False),  # steps replayed from a given prefix (not generated)
    ("outcome_reward", pa.float64(), False),
    ("success", pa.bool_(), False),
    ("done", pa.bool_(), False),  # False: cut by the step limit
    ("seed", pa.int64(), False),  # the episode's sampling seed
    ("task_seed", pa.int64(), False),  # the task's own seed: reset(task) restores it
    ("task_meta", pa.string(), False),  # JSON of the task's adapter-specific fields
    ("error", pa.string(), True),  # set when the episode crashed (never silently dropped)
)

# One scorer rollout (mc_rollouts), also the body of a step-reward memo row (mc_memo).
_MC_ROLLOUT_FIELDS = (
    ("branch_id", pa.string(), False),  # the trajectory (expert or agent branch) being scored
    ("task_id", pa.string(), False),
    ("step", pa.int32(), False),  # t: the scored action is steps[t-1] (1-based)
    ("rollout", pa.int32(), False),
    ("seed", pa.int64(), False),
    ("outcome_reward", pa.float64(), False),
    ("n_steps", pa.int32(), False),
    ("error", pa.string(), True),
)

SCHEMAS: dict[str, ArtifactSchema] = {
    s.kind: s
    for s in [
        ArtifactSchema(
            "tasks",
            1,
            _s(
                ("task_id", pa.string(), False),
                ("env", pa.string(), False),
                ("split", pa.string(), False),
                ("seed", pa.int64(), False),
                ("meta", pa.string(), False),  # JSON of adapter-specific fields
            ),
            "Task listing of one split.",
        ),
        ArtifactSchema("trajectories", 1, _s(*_TRAJ_FIELDS), "Episodes: expert demonstrations, agent runs, evaluations."),
        ArtifactSchema(
            "branches",
            1,
            _s(
                *_TRAJ_FIELDS,
                ("branch_id", pa.string(), False),
                ("expert_traj_id", pa.string(), False),
                ("iteration", pa.int32(), False),
            ),
            "Exploration along an expert: prefix e_{1:j} replayed (prefix_len=j), then the agent's own steps.",
        ),
        ArtifactSchema("mc_rollouts", 1, _s(*_MC_ROLLOUT_FIELDS), "Scorer rollouts from a restored prefix ending in action a_t (Eq. 3-5)."),
        ArtifactSchema(
            "mc_memo",
            1,
            _s(
                ("key", pa.string(), False),  # ipr_core.mc_memo.keys(...).exact: what decides the estimate
                ("action_key", pa.string(), False),  # the same without the rendered context (state + action)
                *_MC_ROLLOUT_FIELDS,  # branch_id: the trajectory whose scoring computed it
            ),
            "Step-reward memo: scorer rollouts keyed by what decides their estimate (reused across branches and iterations).",
        ),
        ArtifactSchema(
            "step_rewards",
            1,
            _s(
                ("branch_id", pa.string(), False),
                ("task_id", pa.string(), False),
                ("step", pa.int32(), False),
                ("reward", pa.float64(), False),
                ("n_rollouts", pa.int32(), False),  # 0 for the last step (reward = outcome)
                ("is_last", pa.bool_(), False),
            ),
            "Monte Carlo step rewards r_s(s_t, a_t).",
        ),
        ArtifactSchema(
            "pairs",
            1,
            _s(
                ("prompt", MESSAGES, False),
                ("chosen", MESSAGES, False),
                ("rejected", MESSAGES, False),
                ("pair_id", pa.string(), False),
                ("kind", pa.string(), False),  # outcome | step
                ("task_id", pa.string(), False),
                ("step", pa.int32(), False),  # j: expert steps in the prompt
                ("chosen_source", pa.string(), False),  # expert | agent
                ("chosen_step_reward", pa.float64(), True),
                ("rejected_step_reward", pa.float64(), True),
                ("chosen_outcome", pa.float64(), False),
                ("rejected_outcome", pa.float64(), False),
                ("iteration", pa.int32(), False),
            ),
            "Preference pairs in TRL's conversational format plus IPR provenance columns.",
        ),
        ArtifactSchema(
            "sft",
            1,
            _s(
                ("messages", MESSAGES, False),
                ("task_id", pa.string(), False),
                ("traj_id", pa.string(), False),
            ),
            "SFT samples in TRL's conversational format.",
        ),
        ArtifactSchema(
            "eval",
            1,
            _s(
                ("task_id", pa.string(), False),
                ("model", pa.string(), False),
                ("iteration", pa.int32(), False),
                ("outcome_reward", pa.float64(), False),
                ("success", pa.bool_(), False),
                ("n_steps", pa.int32(), False),
                ("error", pa.string(), True),
            ),
            "Held-out evaluation, one row per task.",
        ),
        ArtifactSchema(
            "metrics",
            1,
            _s(
                ("name", pa.string(), False),
                ("value", pa.float64(), False),
                ("step", pa.int64(), False),
            ),
            "Scalar training/evaluation metrics.",
        ),
        ArtifactSchema(
            "audit",
            1,
            _s(
                ("branch_id", pa.string(), False),  # the agent branch whose step j+1 is compared with the expert's
                ("task_id", pa.string(), False),
                ("step", pa.int32(), False),
                ("expert_estimate", pa.float64(), False),  # the run's MC estimates (configured N)
                ("agent_estimate", pa.float64(), False),
                ("expert_reference", pa.float64(), False),  # independent estimates with the audit's large N
                ("agent_reference", pa.float64(), False),
                ("n", pa.int32(), False),
                ("n_reference", pa.int32(), False),
            ),
            "Step-reward audit: MC estimates against a large-N reference, per expert/agent step pair.",
        ),
    ]
}


def get_schema(kind: str) -> ArtifactSchema:
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise SchemaError(f"unknown artifact kind {kind!r}; known: {sorted(SCHEMAS)}") from None


def _type_matches(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual.equals(expected):
        return True
    # large_string/string and large_list/list are the same logical type for us
    # (pandas and datasets produce either).
    if pa.types.is_string(expected) and (pa.types.is_large_string(actual) or pa.types.is_string_view(actual)):
        return True
    if pa.types.is_list(expected) and (pa.types.is_large_list(actual) or pa.types.is_list(actual)):
        return _type_matches(actual.value_type, expected.value_type)
    if pa.types.is_struct(expected) and pa.types.is_struct(actual):
        names = [expected.field(i).name for i in range(expected.num_fields)]
        got = {actual.field(i).name: actual.field(i).type for i in range(actual.num_fields)}
        return all(n in got and _type_matches(got[n], expected.field(n).type) for n in names) and len(got) == len(names)
    if pa.types.is_null(actual):
        return True  # an all-null column of an empty/nullable field
    return False


def conform(table: pa.Table, kind: str, where: str = "<table>") -> pa.Table:
    """Validate ``table`` against ``kind``'s schema and return it cast to it exactly.

    Raises SchemaError naming ``where`` (a file or URI) and the offending field.
    """
    spec = get_schema(kind)
    names = set(table.column_names)
    missing = [f.name for f in spec.schema if f.name not in names]
    if missing:
        raise SchemaError(f"{where}: {kind} v{spec.version} is missing column(s) {missing}")
    extra = sorted(names - set(spec.schema.names))
    if extra:
        raise SchemaError(f"{where}: {kind} v{spec.version} has unexpected column(s) {extra}")
    cols = []
    for field in spec.schema:
        col = table.column(field.name)
        if not _type_matches(col.type, field.type):
            raise SchemaError(f"{where}: column {field.name!r} has type {col.type}, expected {field.type}")
        if not field.nullable and col.null_count:
            raise SchemaError(f"{where}: column {field.name!r} has {col.null_count} null value(s) but is required")
        try:
            cols.append(col.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise SchemaError(f"{where}: column {field.name!r} cannot be cast to {field.type}: {e}") from None
    return pa.Table.from_arrays(cols, schema=spec.schema)


def from_rows(rows: list[dict], kind: str, where: str = "<rows>") -> pa.Table:
    """Build a validated table of ``kind`` from python dict rows."""
    spec = get_schema(kind)
    if rows:
        for i, r in enumerate(rows):
            if set(r) != set(spec.schema.names):
                missing = sorted(set(spec.schema.names) - set(r))
                extra = sorted(set(r) - set(spec.schema.names))
                raise SchemaError(f"{where}: row {i} of {kind}: missing {missing}, unexpected {extra}")
    try:
        table = pa.Table.from_pylist(rows, schema=spec.schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise SchemaError(f"{where}: rows do not fit the {kind} schema: {e}") from None
    return conform(table, kind, where)
