"""The per-model rows flag what training did not do: a model that is its input, a cut by the time cap."""

from __future__ import annotations

from ipr_core import store
from ipr_core.config import load_config
from ipr_core.pipeline import plan
from ipr_core.pipeline.summary import _training


def _manifest(digest: str, inputs: dict, **meta) -> store.Manifest:
    return store.Manifest("checkpoint", 1, 0, (), digest, inputs=inputs, meta=meta)


def _train_node():
    return next(n for n in plan(load_config(None, ["pipeline.iterations=1"]), 1) if n.stage == "train")


def test_a_model_equal_to_its_input_is_flagged():
    n = _train_node()
    policy = f"/r/{dict(n.inputs)['policy_uri']}"
    same = _training("/r", {n.key: _manifest("d1", {policy: "d1"}, steps=1, planned_steps=1)}, n)
    assert same["note"] == "train changed no weight: the model is its input (1 steps)"
    none = _training("/r", {n.key: _manifest("d2", {policy: "d1"}, steps=0, planned_steps=0)}, n)
    assert none["note"] == "train changed no weight: the model is its input (0 steps, no usable pair)"
    trained = _training("/r", {n.key: _manifest("d2", {policy: "d1"}, steps=5, planned_steps=5)}, n)
    assert trained == {"train_steps": "5/5", "note": None}


def test_a_cut_by_the_time_cap_is_flagged():
    n = _train_node()
    cut = _training("/r", {n.key: _manifest("d2", {}, steps=3, planned_steps=9, cut_by_time=True)}, n)
    assert cut == {"train_steps": "3/9", "note": "train cut by its time cap at 3/9 steps"}
