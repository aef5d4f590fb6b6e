"""The one declaration of a pipeline stage, and what follows from it.

``@stage(...)`` on a function in ``ipr_core.pipeline.stages`` declares, once:
- ``name``: the stage's one name (Prefect task names, the UI, ``ipr status``);
- ``path``: where its artifact lives in a run folder (a template over its
  parameters, e.g. ``iter-{iteration:02d}/explore/shard-{shard:03d}``);
- ``kind``: the output's schema kind (``checkpoint`` for a model folder);
- ``reads``: the config fields whose values define the result (its identity);
- ``cost``: config fields it reads that change only speed or memory (batch
  sizes, worker counts, cache budgets): left out of its identity on purpose;
- ``needs``: which group of ``pipeline.resources`` it asks a Ray or Dask
  cluster for (generation, environment, training, light; placement.py).
Its inputs are the function's parameters named ``*_uri`` / ``*_uris``; its other
parameters (iteration, shard, tag) are part of its identity. The body receives
a :class:`Context` whose ``cfg`` allows exactly ``reads`` + ``cost``.

A stage's identity (its cache key and reuse check) is its name, the values of
its declared reads, its parameters, its inputs' content digests and the code
version: never the run name or storage root. See docs/run-layout.md.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pydantic import BaseModel

from ipr_core import code_version
from ipr_core.pipeline.view import ConfigView, value_at


@dataclass(frozen=True)
class Context:
    """What a stage body gets besides its inputs: the config view, a scratch
    folder that lives until its output is written, a progress label, and the
    storage root (where caches shared by the root's runs live: the step-reward memo)."""

    cfg: Any  # ConfigView over IPRConfig
    workdir: Path
    label: str
    root: str = ""


@dataclass(frozen=True)
class Rows:
    """A dataset output: rows of the stage's kind, plus manifest meta."""

    rows: Sequence[Mapping[str, Any]]
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Folder:
    """A checkpoint output: a local model folder (safetensors + tokenizer + config)."""

    path: Path
    meta: Mapping[str, Any] = field(default_factory=dict)


Output = Rows | Folder


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable[..., Output]
    path: str
    kind: str
    reads: tuple[str, ...]
    cost: tuple[str, ...]
    inputs: tuple[str, ...]  # parameter names holding input URIs (derived from the signature)
    params: tuple[str, ...]  # other parameters (part of the identity)
    doc: str = ""
    # What it asks a cluster for: a group of pipeline.resources (generation, environment, training, light).
    needs: str = "light"

    def out_path(self, params: Mapping[str, Any]) -> str:
        """The artifact's path relative to the run folder."""
        return self.path.format(**params)

    def view(self, cfg: BaseModel) -> ConfigView:
        return ConfigView(cfg, self.reads + self.cost, self.name)

    def read_values(self, cfg: BaseModel) -> dict[str, Any]:
        return {p: value_at(cfg, p) for p in self.reads}


def _split_signature(fn: Callable) -> tuple[tuple[str, ...], tuple[str, ...]]:
    names = list(inspect.signature(fn).parameters)
    if not names or names[0] != "ctx":
        raise TypeError(f"stage function {fn.__name__} must take ctx first")
    inputs = tuple(n for n in names[1:] if n.endswith(("_uri", "_uris")))
    return inputs, tuple(n for n in names[1:] if n not in inputs)


NEEDS = ("generation", "environment", "training", "light")


def stage(name: str, *, path: str, kind: str, reads: Sequence[str], cost: Sequence[str] = (), needs: str = "light") -> Callable[[Callable[..., Output]], Stage]:
    """Declare a stage (see the module docstring)."""
    if needs not in NEEDS:
        raise ValueError(f"stage {name}: needs={needs!r} is not one of {NEEDS}")

    def deco(fn: Callable[..., Output]) -> Stage:
        inputs, params = _split_signature(fn)
        return Stage(name, fn, path, kind, tuple(reads), tuple(cost), inputs, params, inspect.getdoc(fn) or "", needs)

    return deco


def recipe(st: Stage, cfg: BaseModel, params: Mapping[str, Any], input_digests: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Everything the stage's result depends on, as JSON (what ``ipr explain`` diffs)."""
    return {
        "stage": st.name,
        "code": code_version(),
        "reads": st.read_values(cfg),
        "params": {k: params[k] for k in st.params},
        "inputs": {k: list(input_digests[k]) for k in st.inputs},
    }


def identity(rec: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(rec, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:32]
