"""A read-only view of the run config that allows only the fields a stage declared.

A stage's identity is computed from the config fields it declares (its
``reads``) plus its cost-only fields (``cost``, read but left out of the
identity). Reading any other field is a bug that would make the stage reuse an
artifact computed under a different value, so the view raises at once, naming
the stage and the field; the pipeline tests exercise every stage through it.
"""

from __future__ import annotations

from typing import Any, Iterable

from pydantic import BaseModel


class UndeclaredRead(AttributeError):
    """A stage read a config field it did not declare."""


def covers(declared: Iterable[str], path: str) -> bool:
    """True when ``path`` is a declared field or lies inside a declared section."""
    return any(path == d or path.startswith(d + ".") for d in declared)


class ConfigView:
    """Attribute access on ``cfg`` limited to ``allowed`` dotted paths.

    A section that is declared whole is handed out as the real (frozen) pydantic
    object; a section only partly declared comes back as another view, so that
    ``cfg.sampling.top_p`` works while ``cfg.sampling.batch_size`` raises unless
    declared too.
    """

    __slots__ = ("_obj", "_allowed", "_stage", "_prefix")

    def __init__(self, obj: BaseModel, allowed: Iterable[str], stage: str, prefix: str = ""):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_allowed", tuple(allowed))
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        path = f"{self._prefix}{name}"
        value = getattr(self._obj, name)  # AttributeError for a field that does not exist at all
        if covers(self._allowed, path):
            return value
        if isinstance(value, BaseModel):  # descend: the error names the full field
            return ConfigView(value, self._allowed, self._stage, path + ".")
        raise UndeclaredRead(f"stage {self._stage!r} read config field {path!r}, which its declaration does not list (add it to reads=, or to cost= if it only changes speed)")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the config is read-only")

    def __repr__(self) -> str:
        return f"ConfigView({self._stage!r}, {self._prefix or '<root>'})"


def value_at(obj: BaseModel, path: str) -> Any:
    """The JSON value of the dotted ``path`` in ``obj`` (a section becomes a dict)."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj.model_dump(mode="json") if isinstance(obj, BaseModel) else obj
