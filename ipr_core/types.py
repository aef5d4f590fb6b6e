"""Typed records shared by environments, rollouts, the algorithm and training.

They mirror the Arrow schemas in ``schemas.py`` (``to_row``/``from_row``), so a
stage can work on plain dataclasses and write validated Parquet.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, TypedDict


class Message(TypedDict):
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class Task:
    """One environment instance: the same (env, task_id, seed) always resets to the same state."""

    task_id: str
    env: str
    split: str
    seed: int
    meta: Mapping[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict:
        return {"task_id": self.task_id, "env": self.env, "split": self.split, "seed": self.seed, "meta": json.dumps(dict(self.meta), sort_keys=True)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Task":
        return cls(row["task_id"], row["env"], row["split"], int(row["seed"]), json.loads(row["meta"]))


@dataclass(frozen=True)
class Step:
    """One ReAct step: what the agent thought and did, what it saw, the outcome-so-far."""

    thought: str
    action: str
    observation: str
    reward: float = 0.0

    def to_row(self) -> dict:
        return {"thought": self.thought, "action": self.action, "observation": self.observation, "reward": float(self.reward)}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Step":
        return cls(row["thought"], row["action"], row["observation"], float(row["reward"]))

    def assistant_text(self) -> str:
        # A malformed reply (no usable action, see rollout.malformed_step) is kept
        # verbatim in ``thought`` with ``action == ""``: render what was said.
        return format_react(self.thought, self.action) if self.action else self.thought


@dataclass(frozen=True)
class Trajectory:
    traj_id: str
    task: Task
    source: str  # expert | agent | scorer | eval
    system: str
    instruction: str  # first user message: the task and the initial observation
    steps: tuple[Step, ...]
    prefix_len: int = 0  # steps replayed from a given prefix, not generated
    outcome_reward: float = 0.0
    success: bool = False
    done: bool = False
    seed: int = 0
    error: str | None = None

    def to_row(self) -> dict:
        return {
            "traj_id": self.traj_id,
            "task_id": self.task.task_id,
            "env": self.task.env,
            "split": self.task.split,
            "source": self.source,
            "system": self.system,
            "instruction": self.instruction,
            "steps": [s.to_row() for s in self.steps],
            "prefix_len": self.prefix_len,
            "outcome_reward": float(self.outcome_reward),
            "success": bool(self.success),
            "done": bool(self.done),
            "seed": int(self.seed),
            "task_seed": int(self.task.seed),
            "task_meta": json.dumps(dict(self.task.meta), sort_keys=True),
            "error": self.error,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any], task: Task | None = None) -> "Trajectory":
        # The task (its own seed and meta) is what reset() needs to restore the
        # episode; ``seed`` is the episode's sampling seed, a different number.
        task = task or Task(row["task_id"], row["env"], row["split"], int(row["task_seed"]), json.loads(row["task_meta"]))
        return cls(
            traj_id=row["traj_id"],
            task=task,
            source=row["source"],
            system=row["system"],
            instruction=row["instruction"],
            steps=tuple(Step.from_row(s) for s in row["steps"]),
            prefix_len=int(row["prefix_len"]),
            outcome_reward=float(row["outcome_reward"]),
            success=bool(row["success"]),
            done=bool(row["done"]),
            seed=int(row["seed"]),
            error=row.get("error"),
        )

    @property
    def actions(self) -> tuple[str, ...]:
        return tuple(s.action for s in self.steps)


# --- the ReAct format, one parser for every environment -----------------------------

_THOUGHT = re.compile(r"^\s*thought\s*:\s*", re.IGNORECASE)
_ACTION = re.compile(r"(?im)^[ \t]*action[ \t]*:[ \t]*")


class MalformedAction(ValueError):
    """The model output has no ``Action:`` line (or an empty one)."""


def format_react(thought: str, action: str) -> str:
    return f"Thought: {thought}\nAction: {action}"


def parse_react(text: str) -> tuple[str, str]:
    """Split "Thought: ...\\nAction: ..." into (thought, action).

    Tolerant of surrounding whitespace, case and a missing thought; strict about
    the action: no ``Action:`` line, or an empty action, raises MalformedAction.
    Only the first line after ``Action:`` is the action (models often keep going).
    """
    matches = list(_ACTION.finditer(text))
    if not matches:
        raise MalformedAction(f"no 'Action:' line in model output {text[:120]!r}")
    m = matches[0]
    thought = _THOUGHT.sub("", text[: m.start()], count=1).strip()
    action = text[m.end() :].split("\n", 1)[0].strip()
    if not action:
        raise MalformedAction(f"empty action in model output {text[:120]!r}")
    return thought, action
