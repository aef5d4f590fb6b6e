"""Stage identity through the real stages (no Prefect): what a stage reads,
not where it lives, decides whether it is recomputed.

- changing mc.n_rollouts recomputes the MC stages and what reads them, never
  exploration (it does not read mc.n_rollouts);
- a second run name with the same reads copies every artifact instead of computing it;
- ``ipr explain`` names the changed read;
- every declared stage is exercised through the config view, so an undeclared read fails here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_RUN
from ipr_core import store
from ipr_core.config import load_config
from ipr_core.pipeline import STAGES, plan, run_local, run_uri

pytest.importorskip("minigrid")

ROOT = Path(__file__).resolve().parents[1]


def _manifests(run: str) -> dict[str, store.Manifest]:
    return {i.uri[len(run) :].strip("/"): store.read_manifest(i.uri) for i in store.ls(run) if i.complete}


def _computed_since(run: str, t0: float) -> set[str]:
    return {k for k, m in _manifests(run).items() if m.origin == "computed" and m.created_at >= t0}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    cfg = load_config(None, [*TINY_RUN, f"storage.root={root}", "run_name=first"])
    run_local(cfg)
    return root, cfg


def test_every_stage_of_the_plan_ran_through_its_declaration(first_run):
    _, cfg = first_run
    ran = {n.stage for n in plan(cfg, 2)}
    # each one read only what it declares, or it would have raised; the reward-model
    # stages run only with mc.mode=reward_model / hybrid (tests/test_reward_model_stage.py runs them)
    learned = {"reward-model", "agent-rm-rewards", "expert-rm-rewards", "hybrid-mc", "hybrid-rewards"}
    # every expert step up front: mc.expert_steps=all (tests/test_paired_expert_mc.py, tests/test_mc_memo.py run them)
    up_front = {"expert-mc", "expert-rewards"}
    assert ran == set(STAGES) - learned - up_front
    assert up_front <= {n.stage for n in plan(cfg.model_copy(update={"mc": cfg.mc.model_copy(update={"expert_steps": "all"})}), 2)}
    hybrid = cfg.model_copy(update={"mc": cfg.mc.model_copy(update={"mode": "hybrid", "reward_model_from": 1})})
    both = cfg.model_copy(update={"mc": cfg.mc.model_copy(update={"mode": "reward_model", "reward_model_from": 1, "reward_model_experts": True})})
    assert learned <= {n.stage for n in plan(hybrid, 2)} | {n.stage for n in plan(both, 2)}
    ms = _manifests(run_uri(cfg))
    assert all(m.identity and m.recipe["stage"] in STAGES for m in ms.values())


def test_another_run_name_copies_everything(first_run):
    root, cfg = first_run
    import time

    t0 = time.time()
    second = cfg.model_copy(update={"run_name": "second"})
    run_local(second)
    run = run_uri(second)
    assert _computed_since(run, t0) == set()
    first_ms, second_ms = _manifests(run_uri(cfg)), _manifests(run)
    assert set(first_ms) == set(second_ms)
    for key, m in second_ms.items():
        assert m.origin == f"copied from {store.join(run_uri(cfg), key)}" and m.digest == first_ms[key].digest, key


def test_mc_rollouts_recompute_mc_but_not_exploration(first_run):
    root, cfg = first_run
    import time

    third = load_config(None, [*TINY_RUN, f"storage.root={root}", "run_name=third"])
    run_local(third)  # copies of the first run
    t0 = time.time()
    changed = load_config(None, [*TINY_RUN, f"storage.root={root}", "run_name=third", "mc.n_rollouts=3"])
    explain = subprocess.run([sys.executable, "-m", "ipr_cli.main", "explain", run_uri(third), "expert-mc-paired", "--set", "mc.n_rollouts=3"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert explain.returncode == 0, explain.stderr
    assert "config mc.n_rollouts changed: 2 -> 3" in explain.stdout and "up to date" not in explain.stdout
    run_local(changed)
    computed = _computed_since(run_uri(changed), t0)
    assert {"iter-01/expert_mc/shard-000", "iter-01/expert_mc/shard-001", "iter-01/agent_mc/shard-000", "iter-01/expert_rewards"} <= computed
    assert not any("explore" in k for k in computed), computed
    assert not computed & {"experts/train", "sft/model", "base/model", "eval/test/sft", "tasks/test"}
    again = subprocess.run([sys.executable, "-m", "ipr_cli.main", "explain", run_uri(third), "explore"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("up to date") == 2, again.stdout


def test_a_copied_run_folder_is_up_to_date_where_it_is(first_run, tmp_path):
    """Nothing in a stage's identity names where the run lives: a copy of the
    run folder elsewhere has every stage up to date, and the CLI acts on the copy."""
    import shutil

    root, cfg = first_run
    copy = tmp_path / "elsewhere" / "moved"
    shutil.copytree(run_uri(cfg), copy)
    status = subprocess.run([sys.executable, "-m", "ipr_cli.main", "status", str(copy)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "MISSING" not in status.stdout and str(copy / "sft" / "model") in status.stdout, status.stdout
    explain = subprocess.run([sys.executable, "-m", "ipr_cli.main", "explain", str(copy)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert explain.returncode == 0 and explain.stdout.strip().endswith("0/17 stages would be recomputed"), explain.stdout


def test_damage_is_found_by_verify_and_recomputed_on_resume(first_run, tmp_path):
    """A part truncated behind its manifest and a checkpoint file with flipped
    bytes: `ipr artifacts verify` names both (exit 1), and a rerun recomputes
    exactly them; their content comes out the same, so nothing downstream reruns."""
    import shutil
    import time

    root, cfg = first_run
    damaged_root = tmp_path / "root"
    shutil.copytree(run_uri(cfg), damaged_root / "first")
    run = str(damaged_root / "first")
    pairs = store.read_manifest(store.join(run, "iter-01/pairs"))
    part = Path(run, "iter-01/pairs", pairs.files[0].path)
    part.write_bytes(part.read_bytes()[:-10])
    weights = next(Path(run, "sft/model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    verify = subprocess.run([sys.executable, "-m", "ipr_cli.main", "artifacts", "verify", run], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 1, verify.stdout
    damaged = {line.split()[1] for line in verify.stdout.splitlines() if line.startswith("DAMAGED")}
    assert damaged == {store.join(run, "iter-01/pairs"), store.join(run, "sft/model")}, verify.stdout
    t0 = time.time()
    store._INTACT.clear()  # this process verified the originals' digests already
    run_local(cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"root": str(damaged_root)})}))
    assert _computed_since(run, t0) == {"iter-01/pairs", "sft/model"}
    again = subprocess.run([sys.executable, "-m", "ipr_cli.main", "artifacts", "verify", run], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stdout
