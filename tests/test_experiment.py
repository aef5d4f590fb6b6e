"""Experiments: variants x seeds as runs under one folder, sharing their upstream stages.

- the experiment file is checked before any work (one `ipr: error:` line);
- two variants that differ only in pair/training settings compute experts,
  SFT and expert MC once (the other copies them) and keep separate iteration
  artifacts; an experiment SIGKILLed mid-way and rerun recomputes only its
  unfinished stages, and its report has every variant with intervals.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import TINY_RUN, kill_when
from ipr_core import store
from ipr_core.config import ConfigError
from ipr_core.experiment import PAPER_VARIANTS, expand, load_experiment
from prefect_fixtures import prefect_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
IPR = [sys.executable, "-m", "ipr_cli.main"]


def _write(tmp_path: Path, **data) -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(yaml.safe_dump({"name": "tiny", **data}, sort_keys=False))
    return p


def test_experiment_file_expands_to_runs(tmp_path):
    (tmp_path / "base.yaml").write_text("env: {train_tasks: 5}\nstorage: {root: /data/x}\n")
    exp = load_experiment(_write(tmp_path, base="base.yaml", overrides=["env.eval_tasks=7"], seeds=[4, 5], variants={"sft": None, "mine": ["training.ipr.lr=0.5"]}), ["env.val_tasks=3"])
    runs = expand(exp)
    assert [(r.variant, r.seed) for r in runs] == [("sft", 4), ("mine", 4), ("sft", 5), ("mine", 5)]  # seed-major
    first, mine = runs[0].cfg, runs[1].cfg
    assert (first.run_name, first.seed, first.storage.root) == ("sft-s4", 4, "/data/x/tiny")
    assert (first.env.train_tasks, first.env.eval_tasks, first.env.val_tasks, first.pipeline.iterations) == (5, 7, 3, 0)
    assert mine.training.ipr.lr == 0.5 and runs[1].uri == "/data/x/tiny/mine-s4"
    assert exp.baseline_variant == "sft" and exp.variants["sft"] == PAPER_VARIANTS["sft"]


@pytest.mark.parametrize(
    "data, named",
    [
        ({"variants": {"a": ["seed=3"]}}, "seed"),
        ({"variants": {"a": []}, "baseline": "b"}, "baseline"),
        ({"variants": {"a": ["training.ipr.lrr=1"]}}, "lrr"),
        ({"variants": {"a": []}, "seeds": [1, 1]}, "seeds"),
        ({"variants": {}}, "variants"),
    ],
)
def test_bad_experiment_fails_before_any_work(tmp_path, data, named):
    path = _write(tmp_path, **data)
    with pytest.raises(ConfigError, match=named):
        expand(load_experiment(path))
    env = {"PATH": str(Path(sys.executable).parent), "PREFECT_HOME": str(tmp_path / "prefect"), "HOME": str(tmp_path)}
    out = subprocess.run(IPR + ["experiment", "-c", str(path), "--set", f"storage.root={tmp_path / 'artifacts'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    first = out.stderr.strip().splitlines()[0]
    assert first.startswith("ipr: error:") and named in first, out.stderr
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "prefect").exists()


def _manifests(folder: str) -> dict[str, store.Manifest]:
    """artifact path (relative to the experiment folder) -> manifest, for every run."""
    out = {}
    for run in ("ipr-s0", "ipr-single-action-s0"):
        for info in store.ls(store.join(folder, run)) if Path(folder, run).is_dir() else []:
            if info.complete:
                out[info.uri[len(folder) :].strip("/")] = store.read_manifest(info.uri)
    return out


@pytest.mark.slow
def test_variants_share_upstream_and_a_killed_experiment_resumes(prefect_server, tmp_path):  # noqa: F811
    pytest.importorskip("minigrid")
    _, env = prefect_server
    root = tmp_path / "artifacts"
    ov = [o for o in TINY_RUN if not o.startswith("seed=")] + ["env.val_tasks=2", f"storage.root={root}"]
    path = _write(tmp_path, overrides=ov, seeds=[0], baseline="ipr", variants={"ipr": None, "ipr-single-action": None}, audit_rollouts=4, audit_sample=4)
    folder = str(root / "tiny")

    # 1. SIGKILL once the second variant has begun its own work (its pairs)
    proc = subprocess.Popen(IPR + ["experiment", "-c", str(path)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_when(proc, lambda: store.exists(store.join(folder, "ipr-single-action-s0", "iter-01", "pairs")), "the second variant's pairs")
    before = _manifests(folder)
    assert "ipr-s0/iter-01/model" in before and "ipr-single-action-s0/eval/test/iter-01" not in before

    # 2. rerun: nothing finished is recomputed, the rest completes
    again = subprocess.run(IPR + ["experiment", "-c", str(path), "--take-over"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # the killed experiment left its leases
    assert again.returncode == 0, again.stderr[-4000:]
    after = _manifests(folder)
    assert {k for k in before if after[k].created_at != before[k].created_at} == set()
    assert "ipr-single-action-s0/eval/test/iter-01" in after

    # 3. upstream computed once, copied by the other variant; iterations each their own
    for key in ("experts/train", "sft/model", "eval/test/sft", "eval/val/sft"):
        origins = sorted(after[f"{v}/{key}"].origin for v in ("ipr-s0", "ipr-single-action-s0"))
        assert origins[0] == "computed" and origins[1].startswith("copied from "), (key, origins)
        assert after[f"ipr-s0/{key}"].digest == after[f"ipr-single-action-s0/{key}"].digest
    for key in ("iter-01/pairs", "iter-01/model"):
        assert after[f"ipr-s0/{key}"].origin == after[f"ipr-single-action-s0/{key}"].origin == "computed", key
    # same exploration, expert and agent MC (shared), pairs of another shape: the same pairs counted
    for key in ("iter-01/explore/shard-000", "iter-01/expert_mc/shard-000", "iter-01/agent_mc/shard-000", "iter-01/expert_rewards"):
        assert after[f"ipr-s0/{key}"].digest == after[f"ipr-single-action-s0/{key}"].digest, key
    counts = [{k: after[f"{v}/iter-01/pairs"].meta[k] for k in ("outcome", "step")} for v in ("ipr-s0", "ipr-single-action-s0")]
    assert counts[0] == counts[1] and counts[0]["outcome"] + counts[0]["step"] > 0, counts

    # 4. the report: every variant, a best row chosen on validation, intervals where computable
    res = json.loads(store.read_bytes(store.join(folder, "report", "results.json")))
    assert res["chosen_on"] == ["val"] and res["baseline"] == "ipr"
    rows = {(r["variant"], r["model"]): r for r in res["table"]}
    assert {("ipr", "sft"), ("ipr", "iter-01"), ("ipr", "best"), ("ipr-single-action", "iter-01"), ("ipr-single-action", "best")} <= set(rows)
    assert rows[("ipr", "best")]["delta"] == 0.0  # the baseline against itself
    md = store.read_bytes(store.join(folder, "report", "report.md")).decode()
    assert "![reward per iteration](data:image/png;base64," in md
    # agent MC's cost per iteration: estimates, and rollouts run or reused or skipped, add up
    mc = res["cost"]["ipr"]["agent_mc"]["iter-01"]
    assert mc["agent_mc_targets"] > 0 and mc["agent_mc_rollouts"] + mc["agent_mc_reused"] == mc["agent_mc_targets"] * 2, mc
    assert "Agent MC per iteration" in md and "| ipr | iter-01 |" in md
    # the step-reward audit ran once per seed, on the first variant with an iteration
    audit = res["audit"]["ipr-s0"]
    assert list(res["audit"]) == ["ipr-s0"] and audit["n_reference"] == 4 and 0 < audit["candidates"] <= 4
    assert audit["rollouts"] > 0 and (audit["mae"] is None or 0.0 <= audit["mae"] <= 1.0)
    report = subprocess.run(IPR + ["report", folder], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and "ipr-single-action" in report.stdout and "best" in report.stdout, report.stdout + report.stderr
