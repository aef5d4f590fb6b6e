"""Prefect's overhead on the IPR pipeline: the same stages with and without Prefect.

1. direct: the same ipr_core stages called in one process, in the pipeline's order
   (ipr_core.pipeline.run_local, no Prefect), on root A;
2. prefect: the Prefect pipeline (ephemeral API unless PREFECT_API_URL is set), on root B;
3. resume: the Prefect pipeline again on root B (everything cached).
Prints wall times and the ratio prefect/direct (goal <= 1.15) and the resume
time (goal: no stage recomputed, under 15 s).

Each mode runs in a fresh process prepared the same way before its clock
starts (API up, the model stack imported): in one process, whichever mode
ran second was faster, on state the first one warmed. Resume runs in the
prefect process.

Measured results (the ratio and resume time, what Prefect adds outside the
stages, and the ratio before flows/task_runners.py, when the stages ran
slower on Prefect's worker threads, each with its own OpenMP team): see
docs/performance.md.

    .venv/bin/python bench/orchestration.py [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a fresh API's migrations, on a busy machine

from ipr_core.pipeline import run_local  # noqa: E402
from ipr_core.config import load_config  # noqa: E402

MARK = "BENCH-RESULT "
BENCH = [
    "env.train_tasks=16", "env.eval_tasks=16", "mc.n_rollouts=3", "mc.shard_size=8", "pipeline.iterations=1", "pipeline.max_workers=1",
    "model.tiny.hidden_size=64", "model.tiny.num_layers=2", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=512",
    "sampling.max_new_tokens=24", "sampling.history_turns=1", "training.sft.epochs=2", "training.sft.lr=0.002",
    "training.sft.expert_episodes_multiplier=2", "training.ipr.epochs=1",
]


def direct(cfg) -> None:
    run_local(cfg)


def warm_imports(cfg) -> None:
    """Import what the stages import lazily (torch, transformers' model classes,
    accelerate, the trainers, the environment's package) before timing: a
    one-off cost of the process (~6 s here) that would otherwise be charged to
    whichever mode runs first, the direct baseline."""
    import accelerate  # noqa: F401
    import transformers

    import ipr_core.experts  # noqa: F401
    import ipr_core.policies.hf  # noqa: F401
    import ipr_core.training.ipr_trainer  # noqa: F401
    import ipr_core.training.sft  # noqa: F401

    for name in ("AutoConfig", "AutoModelForCausalLM", "PreTrainedTokenizerFast", "LlamaConfig", "LlamaForCausalLM", "Qwen2Config", "Qwen2ForCausalLM", "get_scheduler"):
        getattr(transformers, name)
    from ipr_core.envs.base import make_env

    make_env(cfg.env.name, cfg.env.options, cfg.env.max_steps).close()


def _child(mode: str, root: str, overrides: list[str]) -> dict:
    """One mode, timed in this (fresh) process after the same preparation."""
    cfg = load_config(overrides=BENCH + overrides + [f"storage.root={root}/{'a' if mode == 'direct' else 'b'}"])
    from prefect import flow

    from flows.ipr_pipeline import run_pipeline  # import outside the timed region

    # Start the (ephemeral) API and import the model stack before timing:
    # one-off costs of the machine/process, not of either mode. The direct
    # mode starts the API too, so both run next to the same idle server.
    flow(name="warm-up")(lambda: None)()
    warm_imports(cfg)
    t0 = time.perf_counter()
    if mode == "direct":
        direct(cfg)
        return {"direct": time.perf_counter() - t0}
    run_pipeline(cfg)
    t_prefect = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run_pipeline(cfg)
    return {"prefect": t_prefect, "resume": time.perf_counter() - t0, "recomputed": len(out["executed"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--mode", choices=("direct", "prefect"), help=argparse.SUPPRESS)  # internal: one mode in this process
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(MARK + json.dumps(_child(args.mode, args.root, args.overrides)), flush=True)
        return
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("PREFECT_HOME", str(Path(tmp) / "prefect"))  # shared by both processes
        for mode in ("direct", "prefect"):
            sets = [a for o in args.overrides for a in ("--set", o)]
            out = subprocess.run([sys.executable, __file__, "--mode", mode, "--root", tmp, *sets], stdout=subprocess.PIPE, text=True, check=True).stdout
            res.update(json.loads(next(line for line in reversed(out.splitlines()) if line.startswith(MARK))[len(MARK) :]))
    t_direct, t_prefect, t_resume, n = res["direct"], res["prefect"], res["resume"], res["recomputed"]
    print(f"{'mode':<28} {'wall s':>8}")
    print(f"{'direct ipr_core stages':<28} {t_direct:8.1f}")
    print(f"{'prefect pipeline':<28} {t_prefect:8.1f}")
    print(f"{'prefect resume (finished)':<28} {t_resume:8.1f}   stages recomputed: {n}")
    print(f"ratio prefect/direct = {t_prefect / t_direct:.3f}  (goal <= 1.15)")
    print(f"resume: {t_resume:.1f} s, {n} stages recomputed  (goal: 0 recomputed, < 15 s)")


if __name__ == "__main__":
    main()
