"""Learning on BabyAI with a tiny local model, through the real stages:
after SFT, held-out success beats the untrained model; one IPR iteration
produces both outcome and step pairs and trains with a finite loss."""

from __future__ import annotations

import math

import pytest

from ipr_core import store
from ipr_core.config import load_config
from ipr_core.pipeline import run_local, run_uri

pytest.importorskip("minigrid")


@pytest.mark.slow
def test_sft_beats_untrained_and_one_iteration_trains(tmp_path):
    cfg = load_config(
        None,
        [
            f"storage.root={tmp_path}", "run_name=learn", "seed=1",
            "env.options={level: BabyAI-GoToObj-v0}", "env.train_tasks=12", "env.eval_tasks=24",
            "model.tiny.hidden_size=96", "model.tiny.num_layers=3", "model.tiny.num_heads=4", "model.tiny.num_kv_heads=2",
            "model.tiny.intermediate_size=256", "model.tiny.vocab_size=768",
            "sampling.max_new_tokens=40", "sampling.history_turns=1", "mc.n_rollouts=3", "mc.shard_size=12",
            "training.sft.epochs=6", "training.sft.lr=0.002", "training.sft.batch_size=16",
            "training.sft.expert_episodes_multiplier=25", "training.ipr.epochs=1", "training.ipr.lr=0.0001", "training.ipr.warmup_ratio=0", "pipeline.iterations=1",
        ],
    )
    run_local(cfg)
    run = run_uri(cfg)

    def meta(key: str) -> dict:
        return dict(store.read_manifest(store.join(run, key)).meta)

    base_eval, sft_eval = meta("eval/test/base"), meta("eval/test/sft")
    assert sft_eval["success_rate"] > base_eval["success_rate"], (base_eval, sft_eval)
    assert sft_eval["success_rate"] >= 0.2, sft_eval
    pairs = meta("iter-01/pairs")
    assert pairs["outcome"] > 0 and pairs["step"] > 0, pairs
    model = meta("iter-01/model")
    assert model["steps"] > 0 and math.isfinite(model["final_loss"]), model
