"""The step-reward memo: what decides a Monte Carlo estimate, as a key.

The step reward of Eq. 3-5 is the mean outcome of N rollouts of the FIXED
scorer from the state reached by the prefix e_{1:t}. What those rollouts
depend on is: the scorer (checkpoint digest) and how it samples (N,
temperature, top_p, max tokens, backend), the environment and the task with
its seed, the prefix's actions (they decide the environment state), the
context the scorer is conditioned on (the rendered conversation within its
history window: thoughts, actions, observations), and the rollout seeds. Not
who proposed the step. So an agent branch that reproduced the expert's step,
a step the previous iteration's agent also took, or two identical branches
share one estimate.

``exact_key`` hashes all of it, and the rollout seeds are derived from that
key (``rollout_seed``): a reused entry is the very estimate a fresh run would
make, not an approximation. ``action_key`` leaves the rendered context out
(the same state and action, whatever the thought text): an opt-in
approximation (``mc.memo_ignores_thoughts``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping, Sequence

from ipr_core.conversation import render_context
from ipr_core.seeding import derive_seed

SEEDS = "derive_seed('mc', exact_key, rollout)"  # the rollout-seed derivation, part of every key


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Scope:
    """What every estimate under one scorer shares: its checkpoint digest and the
    settings of its rollouts (run seed, environment, sampling, N, temperature)."""

    scorer: str
    settings: Mapping[str, Any]

    @cached_property
    def digest(self) -> str:  # once per scope: every target's keys hash it
        return _digest({"scorer": self.scorer, "settings": dict(self.settings), "seeds": SEEDS})


@dataclass(frozen=True)
class Keys:
    exact: str
    action: str


def keys(scope: Scope, traj, step: int, history: int | None) -> Keys:
    """The memo keys of scoring action a_t (1-based ``step``) of ``traj``."""
    prefix = traj.steps[:step]
    state = {"scope": scope.digest, "task": traj.task.to_row(), "actions": [s.action for s in prefix]}
    context = render_context(traj.system, traj.instruction, prefix, history)
    return Keys(exact=_digest({**state, "context": context}), action=_digest(state))


def rollout_seed(exact_key: str, rollout: int) -> int:
    return derive_seed("mc", exact_key, rollout)


def complete_entries(rows: Sequence[Mapping[str, Any]], n_rollouts: int, column: str = "key") -> dict[str, list[Mapping[str, Any]]]:
    """Memo rows grouped by ``column`` (``key`` or ``action_key``), keeping only
    estimates with all N rollouts. Where several computations share an action
    key (different thoughts), the one with the smallest exact key is used:
    the choice does not depend on the order the memo's parts are read in."""
    by: dict[str, dict[str, dict[int, Mapping[str, Any]]]] = {}
    for r in rows:
        by.setdefault(r[column], {}).setdefault(r["key"], {})[int(r["rollout"])] = r
    out = {}
    for k, computations in by.items():
        complete = sorted(exact for exact, rollouts in computations.items() if len(rollouts) == n_rollouts)
        if complete:
            out[k] = [computations[complete[0]][i] for i in range(n_rollouts)]
    return out
