"""The Prefect pipeline end to end against a real Prefect server and a real S3 API.

- a run on s3:// (moto) completes;
- a run SIGKILLed in the middle of agent MC, rerun with the same config,
  recomputes only the unfinished shards and ends with the same artifacts as the
  uninterrupted s3 run;
- a deleted artifact behind a cache record is recomputed; nothing else is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import kill_when
from ipr_core import store
from prefect_fixtures import prefect_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
IPR = [sys.executable, "-m", "ipr_cli.main"]

pytest.importorskip("minigrid")

TINY = """
run_name: {name}
seed: 3
env:
  name: babyai
  options: {{level: BabyAI-GoToObj-v0}}
  train_tasks: 4
  eval_tasks: 4
model:
  tiny: {{hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 64, vocab_size: 320, max_position_embeddings: 512, tokenizer_corpus_episodes: 8}}
sampling: {{max_new_tokens: 12, batch_size: 32, history_turns: 1}}
mc: {{n_rollouts: 2, shard_size: 1}}
training:
  sft: {{epochs: 1, lr: 0.001, batch_size: 8}}
  ipr: {{epochs: 1, batch_size: 4}}
pipeline: {{iterations: 2, max_workers: 1, retries: 0}}
storage: {{root: "{root}"}}
"""


def _config(tmp_path: Path, name: str, root: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(TINY.format(name=name, root=root))
    return p


def _manifests(run: str) -> dict[str, tuple[str, float]]:
    """dataset path (relative to the run) -> (content digest, created_at)."""
    out = {}
    for info in store.ls(run):
        if info.complete:
            m = store.read_manifest(info.uri)
            out[info.uri[len(run) :].strip("/")] = (m.digest, m.created_at)
    return out


@pytest.mark.slow
def test_s3_run_kill_resume_and_deleted_artifact(prefect_server, moto_server, s3_root, tmp_path):  # noqa: F811
    _, env = prefect_server
    env = {**env, **{k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}}

    # 1. an uninterrupted run on s3:// completes
    cfg_s3 = _config(tmp_path, "same", s3_root)
    done = subprocess.run(IPR + ["run", "-c", str(cfg_s3)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "iter-02" in done.stdout and "sft" in done.stdout
    s3_run = store.join(s3_root, "same")
    reference = _manifests(s3_run)
    assert {"iter-02/model", "eval/test/iter-02", "iter-01/expert_rewards", "iter-01/pairs"} <= set(reference)
    status = subprocess.run(IPR + ["status", s3_run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "MISSING" not in status.stdout, status.stdout

    # 2. the same config on a local root, SIGKILLed once agent MC of iteration 1 has begun
    local_root = str(tmp_path / "artifacts")
    cfg_local = _config(tmp_path, "same", local_root)
    run = store.join(local_root, "same")
    proc = subprocess.Popen(IPR + ["run", "-c", str(cfg_local)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    first_shard = store.join(run, "iter-01", "agent_mc", "shard-000")
    kill_when(proc, lambda: store.exists(first_shard), "agent MC")
    before = _manifests(run)
    n_shards = 4
    finished_mc = {k for k in before if k.startswith("iter-01/agent_mc/")}
    assert 1 <= len(finished_mc) < n_shards, finished_mc
    assert "iter-01/model" not in before

    # 3. rerun with the same config: only the unfinished shards and later stages execute
    again = subprocess.run(IPR + ["resume", run, "--take-over"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)  # the killed run left its lease
    assert again.returncode == 0, again.stderr[-4000:]
    after = _manifests(run)
    recomputed = {k for k in before if after[k][1] != before[k][1]}
    assert recomputed == set(), f"finished stages were recomputed: {sorted(recomputed)}"
    new = set(after) - set(before)
    assert {f"iter-01/agent_mc/shard-{s:03d}" for s in range(n_shards)} - finished_mc <= new
    assert not any(k.startswith(("experts", "sft", "scorer", "base")) for k in new)
    # ... and ends with the same artifacts as the uninterrupted run
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in reference.items()}

    # 4. a deleted artifact behind a cache record is recomputed (and nothing else)
    store._fs(run)[0].rm(store.join(run, "iter-01", "pairs", store.MANIFEST))
    third = subprocess.run(IPR + ["resume", run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stderr[-4000:]
    final = _manifests(run)
    changed = {k for k in after if final[k][1] != after[k][1]}
    assert changed == {"iter-01/pairs"}
    assert final["iter-01/pairs"][0] == after["iter-01/pairs"][0]
    report = subprocess.run(IPR + ["report", run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and "iter-02" in report.stdout
