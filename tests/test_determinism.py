"""Deterministic training budgets (steps, not time) and results.

- the same config and seed, run twice on two storage roots (nothing copied
  between them), give byte-identical artifacts: every manifest's content
  digest, the checkpoints and the evaluation datasets included (CPU, fp32);
- a training stage the time cap cut says so in its manifest (``cut_by_time``,
  ``steps`` < ``planned_steps``);
- a cut before ``min_steps`` optimizer steps fails the stage (``TrainingError``)
  instead of passing its input on as trained.
"""

from __future__ import annotations

import pytest

pytest.importorskip("minigrid")
pytest.importorskip("torch")

from helpers import TINY_RUN as TINY  # noqa: E402
from test_training_sft import cut_after  # noqa: E402

from ipr_core import store  # noqa: E402
from ipr_core.config import load_config  # noqa: E402
from ipr_core.pipeline import run_local, run_uri  # noqa: E402
from ipr_core.training.common import TrainingError  # noqa: E402


def _digests(run: str) -> dict[str, str]:
    return {i.uri[len(run) :].strip("/"): store.read_manifest(i.uri).digest for i in store.ls(run) if i.complete}


def _config(root, *overrides: str):
    return load_config(None, [*TINY, f"storage.root={root}", "run_name=det", *overrides])


def test_same_config_and_seed_give_identical_artifacts(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = _config(tmp_path / name)
        assert cfg.training.sft.max_time_s is None and cfg.training.ipr.max_time_s is None
        run_local(cfg)
        runs.append(run_uri(cfg))
    a, b = (_digests(r) for r in runs)
    assert {"sft/model", "iter-01/model", "eval/test/sft", "eval/test/iter-01"} <= set(a)
    assert set(a) == set(b)
    assert {k for k in a if a[k] != b[k]} == set()
    for run in runs:  # no cap: every training stage ran exactly its planned steps
        for key in ("sft/model", "iter-01/model"):
            meta = store.read_manifest(store.join(run, key)).meta
            assert meta["cut_by_time"] is False and meta["steps"] == meta["planned_steps"], (key, meta)


def test_a_cut_training_stage_is_flagged_in_its_manifest(tmp_path, monkeypatch):
    cut_after(monkeypatch, 1)  # the cap runs out after one step, whatever this machine's speed
    cfg = _config(tmp_path, "training.sft.epochs=4", "training.sft.max_time_s=60")
    run_local(cfg, until="sft/model")
    meta = store.read_manifest(store.join(run_uri(cfg), "sft/model")).meta
    assert meta["cut_by_time"] is True and meta["steps"] == 1 < meta["planned_steps"], meta


def test_a_cut_before_min_steps_fails_the_stage(tmp_path, monkeypatch):
    cut_after(monkeypatch, 1)
    cfg = _config(tmp_path, "training.sft.epochs=4", "training.sft.max_time_s=60", "training.sft.min_steps=2")
    with pytest.raises(TrainingError, match=r"SFT \(sft/model\): .* after 1 of \d+ planned optimizer steps, fewer than min_steps=2"):
        run_local(cfg, until="sft/model")
    assert not store.exists(store.join(run_uri(cfg), "sft/model"))
