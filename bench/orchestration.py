"""Prefect's overhead on the IPR pipeline, measured in one run.

1. direct: the same ipr_core stages called in one process, in the pipeline's order
   (ipr_core.stages, no Prefect), on root A;
2. prefect: the Prefect pipeline (ephemeral API unless PREFECT_API_URL is set), on root B;
3. resume: the Prefect pipeline again on root B (everything cached).
Prints wall times and the ratio prefect/direct (goal <= 1.15) and the resume
time (goal: no stage recomputed, under 15 s).

    .venv/bin/python bench/orchestration.py [--set key=value ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from ipr_core import stages as S  # noqa: E402
from ipr_core.config import load_config  # noqa: E402

BENCH = [
    "env.train_tasks=16", "env.eval_tasks=16", "mc.n_rollouts=3", "mc.shard_size=8", "pipeline.iterations=1", "pipeline.max_workers=1",
    "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=512",
    "sampling.max_new_tokens=24", "sampling.history_turns=1", "training.sft.epochs=2", "training.sft.lr=0.002",
    "training.sft.expert_episodes_multiplier=2", "training.ipr.epochs=1",
]


def direct(cfg) -> None:
    p = S.RunPaths.of(cfg)
    experts = S.collect_experts(cfg, p.experts("train"))
    tasks = S.eval_task_list(cfg, p.eval_tasks())
    base = S.build_base_model(cfg, experts, p.base_model())
    S.evaluate(cfg, base, tasks, "base", -1, p.eval("base"))
    sft = S.sft(cfg, base, experts, p.sft_model())
    S.evaluate(cfg, sft, tasks, "sft", 0, p.eval("sft"))
    n = S.n_shards(cfg, len(S.ipr_experts(cfg, S.read_trajectories(experts))))
    rewards = S.expert_step_rewards(cfg, experts, [S.expert_mc_shard(cfg, sft, experts, s, p.expert_mc(s)) for s in range(n)], p.expert_rewards())
    policy = sft
    for k in range(1, cfg.pipeline.iterations + 1):
        br = [S.explore_shard(cfg, policy, experts, k, s, p.explore(k, s)) for s in range(n)]
        mc = [S.agent_mc_shard(cfg, sft, b, p.agent_mc(k, s)) for s, b in enumerate(br)]
        ar = S.agent_step_rewards(cfg, br, mc, p.agent_rewards(k))
        pairs = S.build_pairs(cfg, experts, br, rewards, ar, k, p.pairs(k))
        policy = S.train_iteration(cfg, policy, sft, pairs, experts, k, p.model(k))
        S.evaluate(cfg, policy, tasks, f"iter-{k:02d}", k, p.eval(f"iter-{k:02d}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("PREFECT_HOME", str(Path(tmp) / "prefect"))
        cfg_a = load_config(overrides=BENCH + args.overrides + [f"storage.root={tmp}/a"])
        cfg_b = load_config(overrides=BENCH + args.overrides + [f"storage.root={tmp}/b"])
        from prefect import flow

        from flows.ipr_pipeline import run_pipeline  # import outside the timed region

        # Start the (ephemeral) API before timing: a server start is a one-off
        # cost of the machine, not of the pipeline.
        flow(name="warm-up")(lambda: None)()

        t0 = time.perf_counter()
        direct(cfg_a)
        t_direct = time.perf_counter() - t0
        t0 = time.perf_counter()
        run_pipeline(cfg_b)
        t_prefect = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = run_pipeline(cfg_b)
        t_resume = time.perf_counter() - t0
    print(f"{'mode':<28} {'wall s':>8}")
    print(f"{'direct ipr_core stages':<28} {t_direct:8.1f}")
    print(f"{'prefect pipeline':<28} {t_prefect:8.1f}")
    print(f"{'prefect resume (finished)':<28} {t_resume:8.1f}   stages recomputed: {len(out['executed'])}")
    print(f"ratio prefect/direct = {t_prefect / t_direct:.3f}  (goal <= 1.15)")
    print(f"resume: {t_resume:.1f} s, {len(out['executed'])} stages recomputed  (goal: 0 recomputed, < 15 s)")


if __name__ == "__main__":
    main()
