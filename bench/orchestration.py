"""Prefect's overhead on the IPR pipeline: the same stages with and without
Prefect, and on each task runner.

1. direct: the same ipr_core stages called in one process, in the pipeline's order
   (ipr_core.pipeline.run_local, no Prefect);
2. prefect: the Prefect pipeline (ephemeral API unless PREFECT_API_URL is set)
   with each runner of ``--runners`` (default threads,ray,dask):
   ``pipeline.task_runner=threads``, ``ray`` (a local Ray instance the runner
   starts) and ``dask`` (a local Dask LocalCluster);
3. resume: the threads pipeline again on its root (everything cached);
4. tasks: per runner, trivial Prefect tasks (``echo``) through the runner
   flows.clusters.task_runner builds, so the same runner objects are measured
   without the stages' work.
Prints wall times, the ratio prefect/direct (goal <= 1.15), the resume time
(goal: no stage recomputed, under 15 s) and, per runner, the ratio
runner/threads, the runner's start-up and its cost per trivial task, and
(pipeline wall - threads wall) / stage task runs.

Each mode (and each runner) runs in a fresh process prepared the same way
before its clock starts (API up, the model stack imported), on its own storage
root: in one process, whichever mode ran second was faster, on state the first
one warmed. Resume runs in the threads process. ``--runners threads`` is the
bench as it was before the Ray and Dask runs.

Measured results (the ratio and resume time, what Prefect adds outside the
stages, the ratio before flows/task_runners.py, when the stages ran slower on
Prefect's worker threads, each with its own OpenMP team, and the Ray and Dask
runners against threads): see docs/performance.md.

    .venv/bin/python bench/orchestration.py [--runners threads,ray,dask] [--set key=value ...]
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

from prefect import task  # noqa: E402

from ipr_core.pipeline import run_local  # noqa: E402
from ipr_core.config import load_config  # noqa: E402

MARK = "BENCH-RESULT "
RUNNERS = ("threads", "ray", "dask")
N_TRIVIAL = 50  # trivial tasks per runner: enough that the per-task cost is not lost in the start-up
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
    one-off cost of the process (docs/performance.md) that would otherwise be charged to
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


@task
def echo(x: int) -> int:
    return x


def trivial(cfg, n: int) -> dict:
    """``n`` trivial tasks through the runner the pipeline gets from this config.

    Timed apart: the runner's start and a first task (on Ray and Dask it waits
    for a worker process and its imports), a first batch of ``n`` (Ray may start
    more workers while it runs) and a second batch, the cost per task once the
    runner is up."""
    from prefect import flow

    from flows.clusters import task_runner

    t: list[float] = []

    def batch(k: int) -> None:
        futures = [echo.submit(i) for i in range(k)]  # submitted together, as the stages' shards are
        assert [f.result() for f in futures] == list(range(k))
        t.append(time.perf_counter())

    @flow(name="trivial-tasks", task_runner=task_runner(cfg))
    def tasks_flow() -> None:
        t.append(time.perf_counter())
        for k in (1, n, n):
            batch(k)

    t.append(time.perf_counter())
    tasks_flow()
    t.append(time.perf_counter())
    t0, up, first, b1, b2, end = t
    return {"runner_up": up - t0, "startup": first - t0, "per_task_first": (b1 - first) / n, "per_task": (b2 - b1) / n, "shutdown": end - b2}


def _child(mode: str, runner: str, root: str, overrides: list[str]) -> dict:
    """One mode on one runner, timed in this (fresh) process after the same preparation."""
    # the runner last, so that no --set replaces it; each mode and runner on a root of its own
    sets = [f"pipeline.task_runner={runner}", f"storage.root={root}/{mode}-{runner}"]
    cfg = load_config(overrides=BENCH + overrides + sets)
    from prefect import flow

    from flows.ipr_pipeline import run_pipeline  # import outside the timed region

    # Start the (ephemeral) API and import the model stack before timing:
    # one-off costs of the machine/process, not of either mode. The direct
    # mode starts the API too, so both run next to the same idle server.
    flow(name="warm-up")(lambda: None)()
    warm_imports(cfg)
    if mode == "tasks":
        return {"tasks": trivial(cfg, N_TRIVIAL)}
    t0 = time.perf_counter()
    if mode == "direct":
        direct(cfg)
        return {"direct": time.perf_counter() - t0}
    out = run_pipeline(cfg)
    res = {"wall": time.perf_counter() - t0, "stage_tasks": len(out["executed"])}  # a first run computes every stage
    if runner == "threads":
        t0 = time.perf_counter()
        out = run_pipeline(cfg)
        res.update(resume=time.perf_counter() - t0, recomputed=len(out["executed"]))
    return res


def _spawn(mode: str, runner: str, root: str, overrides: list[str]) -> dict:
    """Run one mode in a fresh process of this script; its BENCH-RESULT line."""
    sets = [a for o in overrides for a in ("--set", o)]
    cmd = [sys.executable, __file__, "--mode", mode, "--runner", runner, "--root", root, *sets]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(next(line for line in reversed(out.splitlines()) if line.startswith(MARK))[len(MARK) :])


def _prepare_env(tmp: str) -> None:
    """What every child process (and the Ray and Dask workers they start) shares."""
    os.environ.setdefault("PREFECT_HOME", str(Path(tmp) / "prefect"))  # one API database for all the processes
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report from a bench (and no network)
    # the workers import this checkout's code whatever their working directory
    root = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


def _print_prefect(res: dict) -> None:
    """The bench's original lines: direct, threads pipeline, resume."""
    t_direct, t_prefect, t_resume, n = res["direct"], res["threads"]["wall"], res["threads"]["resume"], res["threads"]["recomputed"]
    print(f"{'mode':<28} {'wall s':>8}")
    print(f"{'direct ipr_core stages':<28} {t_direct:8.1f}")
    print(f"{'prefect pipeline':<28} {t_prefect:8.1f}")
    print(f"{'prefect resume (finished)':<28} {t_resume:8.1f}   stages recomputed: {n}")
    print(f"ratio prefect/direct = {t_prefect / t_direct:.3f}  (goal <= 1.15)")
    print(f"resume: {t_resume:.1f} s, {n} stages recomputed  (goal: 0 recomputed, < 15 s)")


def _print_runners(res: dict, runners: list[str]) -> None:
    """Per runner: pipeline wall, ratio to threads, start-up and per-task cost."""
    base = res.get("threads")
    print(f"\n{'runner':<8} {'wall s':>8} {'/threads':>9} {'stage tasks':>12} {'start-up s':>11} {'ms/task 1st':>12} {f'ms/task ({N_TRIVIAL} trivial)':>22} {'(wall-threads)/stage task ms':>29}")
    for r in runners:
        p, tr = res[r], res[f"tasks-{r}"]
        ratio = f"{p['wall'] / base['wall']:9.3f}" if base else f"{'-':>9}"
        extra = f"{1000 * (p['wall'] - base['wall']) / p['stage_tasks']:29.0f}" if base else f"{'-':>29}"
        print(f"{r:<8} {p['wall']:8.1f} {ratio} {p['stage_tasks']:12d} {tr['startup']:11.1f} {1000 * tr['per_task_first']:12.1f} {1000 * tr['per_task']:22.1f} {extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--runners", default=",".join(RUNNERS), help="task runners to run the pipeline on, comma-separated (default: %(default)s)")
    ap.add_argument("--mode", choices=("direct", "prefect", "tasks"), help=argparse.SUPPRESS)  # internal: one mode in this process
    ap.add_argument("--runner", choices=RUNNERS, default="threads", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(MARK + json.dumps(_child(args.mode, args.runner, args.root, args.overrides)), flush=True)
        return
    runners = [r for r in args.runners.split(",") if r]
    if not runners or set(runners) - set(RUNNERS):
        ap.error(f"--runners: a comma-separated list of {', '.join(RUNNERS)}")
    res: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        _prepare_env(tmp)
        if "threads" in runners:  # the baseline of the ratio prefect/direct, which is the threads pipeline's
            res.update(_spawn("direct", "threads", tmp, args.overrides))
        for r in runners:
            res[r] = _spawn("prefect", r, tmp, args.overrides)
        for r in runners:
            res[f"tasks-{r}"] = _spawn("tasks", r, tmp, args.overrides)["tasks"]
    if "threads" in res:
        _print_prefect(res)
    _print_runners(res, runners)


if __name__ == "__main__":
    main()
