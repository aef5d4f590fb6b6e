"""Why would a stage be recomputed? Compare what it would read now with the
recipe its artifact's manifest recorded (``ipr explain``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ipr_core import store
from ipr_core.config import IPRConfig
from ipr_core.pipeline.dag import Node
from ipr_core.pipeline.runner import input_digests
from ipr_core.pipeline.stage import identity


@dataclass(frozen=True)
class Verdict:
    key: str
    stage: str
    state: str  # "up to date" | "missing" | "damaged" | "stale"
    reasons: tuple[str, ...] = ()


def _short(v: Any) -> str:
    text = json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], upstream: Mapping[str, str]) -> list[str]:
    out = []
    if old.get("code") != new["code"]:
        out.append(f"code version changed: {old.get('code')} -> {new['code']}")
    for part, label in (("reads", "config"), ("params", "parameter")):
        before = old.get(part, {})
        for k in sorted(set(before) | set(new[part])):
            if before.get(k, "<not recorded>") != new[part].get(k, "<not declared>"):
                out.append(f"{label} {k} changed: {_short(before.get(k, '<not recorded>'))} -> {_short(new[part].get(k, '<not declared>'))}")
    for k, digests in new["inputs"].items():
        if k in upstream:
            out.append(f"input {k}: {upstream[k]}")
        elif old.get("inputs", {}).get(k) != digests:
            out.append(f"input {k} has new content")
    return out or ["recorded without a stage identity (older version): recompute"]


def explain(cfg: IPRConfig, run: str, nodes: Sequence[Node]) -> list[Verdict]:
    """A verdict per node, in DAG order; a node whose upstream would be recomputed is stale too."""
    verdicts: dict[str, Verdict] = {}
    for n in nodes:
        call = n.call(run)
        try:
            m = store.read_manifest(call.out)
        except store.StoreError as e:
            m, damage = None, [str(e)]
        else:
            damage = store.problems(call.out) if m is not None else []
        if m is None or damage:
            why = tuple(damage) if damage else ("no complete artifact: would compute",)
            verdicts[n.key] = Verdict(n.key, n.stage, "damaged" if damage else "missing", why)
            continue
        upstream = {}
        for name, keys in n.inputs:
            changed = [k for k in ((keys,) if isinstance(keys, str) else keys) if verdicts.get(k) and verdicts[k].state != "up to date"]
            if changed:
                upstream[name] = f"upstream {', '.join(changed)} would be recomputed"
        rec = call.recipe(cfg, input_digests(call.inputs, missing="absent"))
        if not upstream and m.identity == identity(rec):
            verdicts[n.key] = Verdict(n.key, n.stage, "up to date")
        else:
            verdicts[n.key] = Verdict(n.key, n.stage, "stale", tuple(_diff(m.recipe, rec, upstream)))
    return list(verdicts.values())
