"""The one environment protocol every adapter implements, and what adapters share.

IPR needs three things from an environment (``docs/algorithm.md``: objects,
prefixes and restore):
- tasks that end in an outcome reward in [0, 1];
- an expert trajectory per task;
- restoring the state after any prefix of actions (reset to the same task and
  seed, replay the prefix) so Monte Carlo rollouts can continue from any step.

Reward convention: ``StepResult.reward`` is the outcome reward the episode
would get if it ended right after this step (0 until success for binary tasks,
the normalised score so far for ScienceWorld). The outcome reward of an episode
is therefore the reward of its last step, whether it ended or hit the limit.

Adapters are declared, with their typed options, in ``registry.py``
(``make_env``, ``validate_env``, ``env_options``: re-exported here); what
several adapters share (split checks, task-list cuts, templated thoughts)
lives below the protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence, TypeVar, runtime_checkable

from ipr_core.envs.registry import (  # noqa: F401  (re-exported: callers import them from here)
    EnvOptions,
    available_envs,
    env_factory,
    env_options,
    make_env,
    options_model,
    register_env,
    validate_env,
)
from ipr_core.types import Task

T = TypeVar("T")


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


# --- what several adapters share --------------------------------------------------------


class ConfiguredEnv:
    """Base of the adapters, declared as ``class X(ConfiguredEnv, name=..., options=XOptions)``.

    ``Options`` (the adapter's options model) validates the options, given as a
    model, a mapping or keywords (keywords override), into ``self.options``;
    ``_configure`` then sets the adapter up from them.
    """

    name: str = "environment"
    Options: ClassVar[type[EnvOptions]] = EnvOptions
    _t: int = 0  # steps taken in the running episode
    _done: bool = True  # no running episode until reset()

    def __init_subclass__(cls, *, name: str | None = None, options: type[EnvOptions] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
        if options is not None:
            cls.Options = options

    def __init__(self, options: EnvOptions | Mapping[str, Any] | None = None, /, **kwargs: Any):
        self.options = self.Options.parse(self.name, options, kwargs)
        self._configure(self.options)

    def _configure(self, options: Any) -> None:
        pass


def check_split(env: str, split: str, splits: Sequence[str]) -> None:
    """ValueError unless ``split`` is one of ``env``'s ``splits``."""
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {env}; choose from {list(splits)}")


def first_n(items: list[T], n: int | None, what: str) -> list[T]:
    """The first ``n`` of ``items`` (all of them for None); ValueError when there are fewer."""
    if n is None:
        return items
    if n > len(items):
        raise ValueError(f"only {len(items)} {what}, {n} requested")
    return items[:n]


def require_episode(done: bool) -> None:
    """RuntimeError when ``step()`` comes without a running episode."""
    if done:
        raise RuntimeError("step() called without a running episode: call reset(task) first")


# A thought template: a format string over ``action``, ``verb`` (its first word,
# lower-cased) and ``rest`` (the words after it), or a function of the three that
# returns the thought, or None when it does not apply.
Thought = str | Callable[[str, str, str], "str | None"]


def two_part(sep: str, template: str) -> Thought:
    """A thought for "<verb> A<sep>B" (``template`` over ``a`` and ``b``); None without ``sep``."""

    def thought(action: str, verb: str, rest: str) -> str | None:
        if sep not in rest:
            return None
        a, b = rest.split(sep, 1)
        return template.format(a=a, b=b)

    return thought


def _apply(rule: Thought | None, action: str, verb: str, rest: str) -> str | None:
    if rule is None:
        return None
    return rule(action, verb, rest) if callable(rule) else rule.format(action=action, verb=verb, rest=rest)


def command_thought(action: str, whole: Mapping[str, Thought], by_verb: Mapping[str, Thought], default: Thought = "Next, I {action}.") -> str:
    """A short deterministic thought for a text command (the experts' templated
    thoughts): the template for the whole command, else for its verb, else ``default``."""
    words = action.split()
    verb, rest = (words[0].lower(), " ".join(words[1:])) if words else ("", "")
    for rule in (whole.get(action), by_verb.get(verb), default):
        text = _apply(rule, action, verb, rest)
        if text is not None:
            return text
    return f"Next, I {action}."
