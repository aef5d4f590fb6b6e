"""The one environment protocol every adapter implements, and its registry.

IPR needs three things from an environment (IPR.md, "Objects"):
- tasks that end in an outcome reward in [0, 1];
- an expert trajectory per task;
- restoring the state after any prefix of actions (reset to the same task and
  seed, replay the prefix) so Monte Carlo rollouts can continue from any step.

Reward convention: ``StepResult.reward`` is the outcome reward the episode
would get if it ended right after this step (0 until success for binary tasks,
the normalised score so far for ScienceWorld). The outcome reward of an episode
is therefore the reward of its last step, whether it ended or hit the limit.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

from ipr_core.types import Task


@dataclass(frozen=True)
class StepResult:
    observation: str
    reward: float  # outcome reward if the episode ended now, in [0, 1]
    done: bool
    info: Mapping[str, Any] = field(default_factory=dict)  # "success": bool, "invalid": bool, ...


class EnvError(RuntimeError):
    """The environment itself failed (crashed process, JVM error): transient, retryable."""


@runtime_checkable
class Environment(Protocol):
    name: str
    max_steps: int

    def list_tasks(self, split: str, n: int | None = None, seed: int = 0) -> list[Task]:
        """Deterministic task listing for a split (same args, same tasks)."""

    def system_prompt(self) -> str:
        """The instruction that describes the task family and the action format."""

    def reset(self, task: Task) -> str:
        """Start ``task``; returns the first user message (task + initial observation)."""

    def step(self, action: str) -> StepResult:
        """Apply one action. Invalid actions return an observation saying so."""

    def expert(self, task: Task) -> list[tuple[str, str]] | None:
        """(thought, action) pairs of an expert for ``task``, or None if there is none."""

    def close(self) -> None:
        """Release resources (processes, JVMs)."""


# --- registry: name -> "module:attr" so optional dependencies load lazily ---------------

_REGISTRY: dict[str, str | Callable[..., Environment]] = {
    "babyai": "ipr_core.envs.babyai:BabyAIEnv",
    "textworld_express": "ipr_core.envs.twx:TextWorldExpressEnv",
    "scienceworld": "ipr_core.envs.scienceworld:ScienceWorldEnv",
    "intercode_sql": "ipr_core.envs.intercode_sql:InterCodeSQLEnv",
}


def register_env(name: str, factory: str | Callable[..., Environment], *, replace: bool = False) -> None:
    if name in _REGISTRY and not replace:
        raise ValueError(f"environment {name!r} is already registered")
    _REGISTRY[name] = factory


def available_envs() -> list[str]:
    return sorted(_REGISTRY)


def env_factory(name: str) -> Callable[..., Environment]:
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown environment {name!r}; registered: {available_envs()}") from None
    if callable(target):
        return target
    module, attr = target.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ImportError(f"environment {name!r} needs an optional dependency: {e}. Install the extra: pip install 'ipr-flow[{name}]'") from e


def make_env(name: str, options: Mapping[str, Any] | None = None, max_steps: int | None = None) -> Environment:
    """Build an environment by registry name with adapter options."""
    kwargs = dict(options or {})
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    return env_factory(name)(**kwargs)


def replay(env: Environment, task: Task, actions: Sequence[str]) -> tuple[str, list[StepResult]]:
    """Restore ``task`` to the state after ``actions``: reset, then replay them."""
    first = env.reset(task)
    results = []
    for a in actions:
        r = env.step(a)
        results.append(r)
        if r.done:
            break
    return first, results
