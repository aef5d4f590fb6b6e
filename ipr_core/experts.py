"""Expert trajectories: each adapter's expert replayed through the environment.

The expert's actions are replayed through ``reset`` + ``step`` rather than
trusted, so the recorded observations, step rewards and outcome are exactly
what an agent following the same actions would get (and what restoring a
prefix reproduces, docs/algorithm.md "Objects"). Every task yields one row: a crashed
environment or a task without an expert becomes a row with ``error`` set, and
an expert that does not reach success stays in with ``success=False``.
Consumers keep ``error is None and success`` (``stages.ipr_experts``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import pyarrow as pa

from ipr_core.envs.base import Environment, EnvError
from ipr_core.progress import bar
from ipr_core.schemas import from_rows
from ipr_core.types import Step, Task, Trajectory

log = logging.getLogger(__name__)


def _run_expert(env: Environment, task: Task, traj_id: str) -> Trajectory:
    plan = env.expert(task)
    if plan is None:
        raise LookupError(f"{env.name} has no expert for task {task.task_id}")
    instruction = env.reset(task)
    steps: list[Step] = []
    done = success = False
    reward = 0.0
    for thought, action in plan:
        r = env.step(action)
        # An adapter may canonicalise the action (ScienceWorld records a menu
        # answer as the option's text): the recorded action must replay exactly.
        steps.append(Step(thought, str(r.info.get("action", action)), r.observation, float(r.reward)))
        reward, done, success = float(r.reward), r.done, bool(r.info.get("success", False))
        if done:
            break
    return Trajectory(traj_id, task, "expert", env.system_prompt(), instruction, tuple(steps), 0, reward, success, done, task.seed, None)


def expert_trajectory(env: Environment, task: Task, traj_id: str | None = None) -> Trajectory:
    """One task's expert trajectory; a crash is retried once, then recorded as an error row."""
    traj_id = traj_id or f"expert-{task.task_id}"
    last: BaseException | None = None
    for attempt in (1, 2):
        try:
            return _run_expert(env, task, traj_id)
        except EnvError as e:  # transient: JVM adapters restart their process on reset()
            log.warning("expert for %s: environment error (attempt %d/2): %s", task.task_id, attempt, e)
            last = e
        except Exception as e:  # deterministic: retrying would fail the same way
            last = e
            break
    error = f"{type(last).__name__}: {last}"
    log.warning("expert for %s failed: %s", task.task_id, error)
    return Trajectory(traj_id, task, "expert", env.system_prompt(), "", (), 0, 0.0, False, False, task.seed, error)


def collect_experts(env: Environment, tasks: Sequence[Task], *, run_seed: int = 0, progress: str | None = None) -> list[Trajectory]:
    """Expert trajectories for ``tasks``, one per task, in order.

    The bundled experts (BabyAI bot, gold action sequences) are deterministic,
    so the result depends only on the tasks (whose seeds ``list_tasks`` derived
    from the run seed); ``run_seed`` is logged for the record. A task listed
    twice gets ids ``expert-{task_id}`` and ``expert-{task_id}-1``. ``progress``
    names a progress bar over the episodes (None: no bar).
    """
    log.info("collecting %d %s experts (run seed %d)", len(tasks), env.name, run_seed)
    out: list[Trajectory] = []
    seen: dict[str, int] = {}
    with bar(len(tasks), progress, "ep") as pbar:
        for task in tasks:
            k = seen.get(task.task_id, 0)
            seen[task.task_id] = k + 1
            out.append(expert_trajectory(env, task, f"expert-{task.task_id}" + (f"-{k}" if k else "")))
            pbar.update(1)
    return out


@dataclass(frozen=True)
class ExpertSummary:
    n: int
    successes: int
    errors: int  # crashed or no expert
    success_rate: float
    mean_reward: float
    mean_steps: float  # over trajectories without error

    def to_dict(self) -> dict:
        return asdict(self)


def summarize_experts(trajs: Sequence[Trajectory]) -> ExpertSummary:
    n = len(trajs)
    ok = [t for t in trajs if t.error is None]
    return ExpertSummary(
        n=n,
        successes=sum(t.success for t in trajs),
        errors=n - len(ok),
        success_rate=sum(t.success for t in trajs) / n if n else 0.0,
        mean_reward=math.fsum(t.outcome_reward for t in trajs) / n if n else 0.0,
        mean_steps=math.fsum(len(t.steps) for t in ok) / len(ok) if ok else 0.0,
    )


def expert_table(trajs: Sequence[Trajectory]) -> pa.Table:
    """The ``trajectories`` Arrow table (schema-validated) of expert trajectories."""
    return from_rows([t.to_row() for t in trajs], "trajectories")
