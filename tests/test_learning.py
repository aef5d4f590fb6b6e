"""Learning on BabyAI with a tiny local model, through the real stages:
after SFT, held-out success beats the untrained model; one IPR iteration
produces both outcome and step pairs and trains with a finite loss."""

from __future__ import annotations

import math

import pytest

from ipr_core import stages as S
from ipr_core import store
from ipr_core.config import load_config

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
            "training.sft.epochs=30", "training.sft.lr=0.002", "training.sft.batch_size=16", "training.sft.max_time_s=75",
            "training.sft.expert_episodes_multiplier=25", "training.ipr.epochs=1", "training.ipr.lr=0.0001", "training.ipr.warmup_ratio=0",
        ],
    )
    p = S.RunPaths.of(cfg)
    experts = S.collect_experts(cfg, p.experts("train"))
    tasks = S.eval_task_list(cfg, p.eval_tasks())
    base = S.build_base_model(cfg, experts, p.base_model())
    base_eval = store.read_manifest(S.evaluate(cfg, base, tasks, "base", -1, p.eval("base"))).meta
    sft = S.sft(cfg, base, experts, p.sft_model())
    sft_eval = store.read_manifest(S.evaluate(cfg, sft, tasks, "sft", 0, p.eval("sft"))).meta
    assert sft_eval["success_rate"] > base_eval["success_rate"], (base_eval, sft_eval)
    assert sft_eval["success_rate"] >= 0.2, sft_eval

    rewards = S.expert_step_rewards(cfg, experts, [S.expert_mc_shard(cfg, sft, experts, 0, p.expert_mc(0))], p.expert_rewards())
    branches = [S.explore_shard(cfg, sft, experts, 1, 0, p.explore(1, 0))]
    agent = S.agent_step_rewards(cfg, branches, [S.agent_mc_shard(cfg, sft, branches[0], p.agent_mc(1, 0))], p.agent_rewards(1))
    pairs = store.read_manifest(S.build_pairs(cfg, experts, branches, rewards, agent, 1, p.pairs(1))).meta
    assert pairs["outcome"] > 0 and pairs["step"] > 0, pairs
    model = S.train_iteration(cfg, sft, sft, p.pairs(1), experts, 1, p.model(1))
    meta = store.read_manifest(model).meta
    assert meta["steps"] > 0 and math.isfinite(meta["final_loss"]), meta
