"""`ipr run`, `ipr resume`, `ipr status`, `ipr report`: the pipeline from the shell."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ipr_core import store
from ipr_core.config import IPRConfig, config_from_json, load_config


def _prefect_env() -> None:
    # Offline-friendly defaults; a user's own settings win.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ipr_core")
    # The local ephemeral API's first start on a fresh PREFECT_HOME runs the
    # database migrations: 39 s on the 2-core default machine (15 s later on),
    # past Prefect's default wait of 20 s, so `make demo` on a fresh checkout
    # failed with "Timed out while attempting to connect to ephemeral Prefect API server".
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")


def register(sub: argparse._SubParsersAction) -> None:
    from ipr_cli.main import add_config_args

    run = sub.add_parser("run", help="run the IPR pipeline (a Prefect flow)", description="Run the IPR pipeline as a Prefect flow: against PREFECT_API_URL if set, else a local ephemeral Prefect. Finished stages of an earlier run with the same config are reused from the cache.")
    add_config_args(run)
    run.set_defaults(func=_run)
    resume = sub.add_parser("resume", help="rerun a run with its saved config, recomputing only what is missing", description="Resume a run: reload RUN/config.json and run again; cached stages are skipped.")
    resume.add_argument("run", help="the run folder (e.g. ./artifacts/ipr-demo or s3://bucket/prefix/ipr-demo)")
    resume.set_defaults(func=_resume)
    status = sub.add_parser("status", help="stage-by-stage completeness of a run, from its manifests")
    status.add_argument("run", help="the run folder")
    status.set_defaults(func=_status)
    report = sub.add_parser("report", help="print the per-iteration table of a run")
    report.add_argument("run", help="the run folder")
    report.set_defaults(func=_report)


def _go(cfg: IPRConfig) -> int:
    _prefect_env()
    from flows.ipr_pipeline import run_pipeline

    out = run_pipeline(cfg)
    print()
    print(f"run: {out['run']}")
    print(out["table"])
    print(f"best: {out['best']} ({out['best_model']})")
    print(f"report: {out['report']}")
    return 0


def _run(args: argparse.Namespace) -> int:
    return _go(load_config(args.config, args.overrides))


def _saved_config(run: str) -> IPRConfig:
    uri = store.join(store.normalize_uri(run), "config.json")
    try:
        return config_from_json(json.loads(store.read_bytes(uri)))
    except store.ArtifactNotFound:
        raise store.ArtifactNotFound(f"{uri} not found: is {run} a run folder?") from None


def _resume(args: argparse.Namespace) -> int:
    return _go(_saved_config(args.run))


def stage_uris(cfg: IPRConfig) -> list[tuple[str, str]]:
    """(stage, uri) of every artifact a complete run has."""
    from ipr_core.stages import RunPaths, ipr_experts, n_shards, read_trajectories

    p = RunPaths.of(cfg)
    out = [("experts", p.experts("train")), ("eval tasks", p.eval_tasks()), ("base model", p.base_model()), ("sft model", p.sft_model())]
    n = n_shards(cfg, len(ipr_experts(cfg, read_trajectories(p.experts("train"))))) if store.exists(p.experts("train")) else 1
    out += [(f"expert MC shard {s}", p.expert_mc(s)) for s in range(n)] + [("expert step rewards", p.expert_rewards())]
    if cfg.pipeline.eval_base:
        out.append(("eval base", p.eval("base")))
    out.append(("eval sft", p.eval("sft")))
    for k in range(1, cfg.pipeline.iterations + 1):
        out += [(f"iter {k} explore shard {s}", p.explore(k, s)) for s in range(n)]
        out += [(f"iter {k} agent MC shard {s}", p.agent_mc(k, s)) for s in range(n)]
        out += [(f"iter {k} agent step rewards", p.agent_rewards(k)), (f"iter {k} pairs", p.pairs(k)), (f"iter {k} model", p.model(k)), (f"iter {k} eval", p.eval(f"iter-{k:02d}"))]
    return out


def _status(args: argparse.Namespace) -> int:
    cfg = _saved_config(args.run)
    stages = stage_uris(cfg)
    done = 0
    for name, uri in stages:
        m = store.read_manifest(uri)
        ok = m is not None and store.exists(uri)
        done += ok
        rows = "" if not ok or m.kind == "checkpoint" else f"{m.rows} rows"
        print(f"{'done' if ok else 'MISSING':<8} {name:<32} {rows:<12} {uri}")
    print(f"{done}/{len(stages)} stages complete")
    return 0


def _report(args: argparse.Namespace) -> int:
    from ipr_core.report import iteration_table
    from ipr_core.stages import RunPaths

    cfg = _saved_config(args.run)
    p = RunPaths.of(cfg)
    rows = []
    for tag, extra in [("base", None), ("sft", None)] + [(f"iter-{k:02d}", k) for k in range(1, cfg.pipeline.iterations + 1)]:
        m = store.read_manifest(p.eval(tag))
        if m is None:
            continue
        row = {"model": tag, "success_rate": m.meta.get("success_rate"), "mean_reward": m.meta.get("mean_reward")}
        if extra:
            pm, tm = store.read_manifest(p.pairs(extra)), store.read_manifest(p.model(extra))
            row.update(outcome_pairs=pm.meta.get("outcome") if pm else None, step_pairs=pm.meta.get("step") if pm else None, train_loss=tm.meta.get("final_loss") if tm else None)
        rows.append(row)
    if not rows:
        print(f"no evaluations yet in {p.run}", file=sys.stderr)
        return 1
    print(iteration_table(rows))
    return 0
