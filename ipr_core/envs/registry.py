"""The registry of environment adapters, and their typed options.

Each adapter is declared once, in ``_REGISTRY``: the name a config uses, where
its class lives and where its options model lives ("module:attr", imported
only when asked for, so optional simulators load lazily). An options model is
a frozen pydantic model (``EnvOptions``, ``extra="forbid"``) listing every
option with its type, default and check; the adapter reads its options only
from it.

``env_options(name, options)`` and ``validate_env(name, options)`` check a name
and its options without building anything (no JVM, no database); ``make_env``
checks the same way, then builds. Every failure is a ``ConfigError`` (a
ValueError) in one line that names the environment, the option and the valid
choices:

    unknown environment 'babyia' (did you mean 'babyai'?); valid names: babyai, intercode_sql, scienceworld, textworld_express
    environment 'babyai' has no option 'levle' (did you mean 'level'?); valid options: actions, level, max_steps
    environment 'babyai', option 'level': unknown BabyAI level 'BabyAI-GoToObjj-v0' (did you mean 'BabyAI-GoToObj-v0'?); choose from ...
"""

from __future__ import annotations

import difflib
import importlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ipr_core.config import ConfigError

if TYPE_CHECKING:
    from ipr_core.envs.base import Environment

O = TypeVar("O", bound="EnvOptions")


class EnvOptions(BaseModel):
    """The options every adapter takes; each adapter subclasses it with its own."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int | None = Field(None, ge=1, description="Episode step limit; None: the adapter's default.")

    @classmethod
    def parse(cls: type[O], env: str, options: "EnvOptions | Mapping[str, Any] | None" = None, overrides: Mapping[str, Any] | None = None) -> O:
        """``options`` (a model or a mapping) updated with ``overrides``, validated for
        environment ``env``; ``ConfigError`` when a key or a value is not valid."""
        if isinstance(options, cls) and not overrides:
            return options
        if isinstance(options, BaseModel):
            data = options.model_dump(exclude_unset=True)
        elif isinstance(options, Mapping):
            data = dict(options)
        elif options is None:
            data = {}
        else:
            raise ConfigError(f"environment {env!r}: options must be a mapping of option names to values, got {type(options).__name__}")
        data.update(overrides or {})
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(describe_option_errors(env, cls, e)) from None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ""."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


Choices = Sequence[str] | Callable[[], "Sequence[str] | None"]  # a callable: None when unknown (package missing)


def _choices(choices: Choices) -> Sequence[str] | None:
    return choices() if callable(choices) else choices


def one_of(what: str, choices: Choices) -> AfterValidator:
    """A field check: the value is one of ``choices`` (else: which are valid)."""

    def check(value: str) -> str:
        valid = _choices(choices)
        if valid is not None and value not in valid:
            raise ValueError(f"unknown {what} {value!r}{did_you_mean(value, valid)}; choose from {list(valid)}")
        return value

    return AfterValidator(check)


def subset_of(what: str, choices: Choices) -> AfterValidator:
    """A field check: every value (of a tuple, or None) is one of ``choices``."""

    def check(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
        valid = _choices(choices)
        bad = sorted(set(values or ()) - set(valid if valid is not None else values or ()))
        if bad:
            raise ValueError(f"unknown {what} {bad}; choose from {list(valid or ())}")
        return values

    return AfterValidator(check)


def comma_separated(value: Any) -> Any:
    """A before-check for tuple options: 'a,b' (a key=value override) is ['a', 'b']."""
    return [t for t in value.split(",") if t] if isinstance(value, str) else value


def _shown(value: Any) -> str:
    shown = json.dumps(value, default=str) if not isinstance(value, Mapping) else "{...}"
    return shown if len(shown) <= 80 else shown[:77] + "..."


def describe_option_errors(env: str, model: type[EnvOptions], err: ValidationError) -> str:
    """One line for a failed validation of ``env``'s options: the unknown keys
    (with the valid ones), else each bad value with why."""
    valid = sorted(model.model_fields)
    unknown = [str(e["loc"][0]) for e in err.errors() if e["type"] == "extra_forbidden"]
    if unknown:
        keys = ", ".join(f"{k!r}{did_you_mean(k, valid)}" for k in unknown)
        return f"environment {env!r} has no option{'s' if len(unknown) > 1 else ''} {keys}; valid options: {', '.join(valid)}"
    by_option: dict[str, tuple[list[str], list[str]]] = {}  # option -> (messages, inputs shown)
    for e in err.errors():
        # loc: (option, list index, ...) or (option, union member, ...); the members are noise.
        loc = ".".join([str(p) for p in e["loc"][:1]] + [str(p) for p in e["loc"][1:] if isinstance(p, int)])
        msgs, got = by_option.setdefault(loc, ([], []))
        msg = e["msg"].removeprefix("Value error, ")
        if msg not in msgs:
            msgs.append(msg)
        if e["type"] != "value_error" and _shown(e.get("input")) not in got:  # our own checks name the value
            got.append(_shown(e.get("input")))
    parts = [(f"option {k!r}: " if k else "") + " or ".join(msgs) + (f" (got {', '.join(got)})" if got else "") for k, (msgs, got) in by_option.items()]
    return f"environment {env!r}{':' if '' in by_option else ','} " + "; ".join(parts)


# --- the registry --------------------------------------------------------------------------


Factory = Callable[..., "Environment"]


@dataclass(frozen=True)
class EnvDecl:
    """An adapter: its factory and its options model, each an object or "module:attr"."""

    factory: str | Factory
    options: str | type[EnvOptions] | None = None  # None: options go to the factory unchecked (test fakes)


_REGISTRY: dict[str, EnvDecl] = {
    "babyai": EnvDecl("ipr_core.envs.babyai:BabyAIEnv", "ipr_core.envs.babyai:BabyAIOptions"),
    "textworld_express": EnvDecl("ipr_core.envs.twx:TextWorldExpressEnv", "ipr_core.envs.twx:TextWorldExpressOptions"),
    "scienceworld": EnvDecl("ipr_core.envs.scienceworld:ScienceWorldEnv", "ipr_core.envs.scienceworld:ScienceWorldOptions"),
    "intercode_sql": EnvDecl("ipr_core.envs.intercode_sql:InterCodeSQLEnv", "ipr_core.envs.intercode_sql:InterCodeSQLOptions"),
    "alfworld": EnvDecl("ipr_core.envs.alfworld:ALFWorldEnv", "ipr_core.envs.alfworld:ALFWorldOptions"),
}


def register_env(name: str, factory: str | Factory, *, options: str | type[EnvOptions] | None = None, replace: bool = False) -> None:
    """Declare adapter ``name``. With an ``options`` model, ``make_env`` calls
    ``factory(validated_options)``; without one, ``factory(**options)``."""
    if name in _REGISTRY and not replace:
        raise ValueError(f"environment {name!r} is already registered")
    _REGISTRY[name] = EnvDecl(factory, options)


def available_envs() -> list[str]:
    return sorted(_REGISTRY)


def _decl(name: str) -> EnvDecl:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown environment {name!r}{did_you_mean(str(name), _REGISTRY)}; valid names: {', '.join(available_envs())}") from None


def _resolve(name: str, target: Any) -> Any:
    if not isinstance(target, str):
        return target
    module, attr = target.split(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ImportError(f"environment {name!r} needs an optional dependency: {e}. Install the extra: pip install 'ipr-flow[{name}]'") from e


def env_factory(name: str) -> Factory:
    return _resolve(name, _decl(name).factory)


def options_model(name: str) -> type[EnvOptions] | None:
    """The options model of adapter ``name`` (None for one registered without)."""
    return _resolve(name, _decl(name).options)


def env_options(name: str, options: Mapping[str, Any] | EnvOptions | None = None, max_steps: int | None = None) -> EnvOptions | dict[str, Any]:
    """The validated options of environment ``name`` (``max_steps``, when given, overrides
    the options'), without building the environment; ``ConfigError`` when the name,
    an option key or a value is not valid. A dict, unchecked, for adapters registered
    without an options model."""
    model = options_model(name)
    overrides = {"max_steps": max_steps} if max_steps is not None else {}
    if model is None:
        return {**dict(options or {}), **overrides}
    return model.parse(name, options, overrides)


def validate_env(name: str, options: Mapping[str, Any] | EnvOptions | None = None, max_steps: int | None = None) -> None:
    """Raise ``ConfigError`` unless ``make_env(name, options, max_steps)`` would get valid options."""
    env_options(name, options, max_steps)


def make_env(name: str, options: Mapping[str, Any] | EnvOptions | None = None, max_steps: int | None = None) -> "Environment":
    """Build an environment by registry name with adapter options (validated first)."""
    opts = env_options(name, options, max_steps)
    factory = env_factory(name)
    return factory(opts) if isinstance(opts, EnvOptions) else factory(**opts)
