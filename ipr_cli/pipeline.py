"""`ipr run`, `ipr resume`, `ipr status`, `ipr report`, `ipr explain`: the pipeline from the shell."""

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
    # database migrations, which on 2 cores takes longer than Prefect's default
    # wait of 20 s, so `make demo` on a fresh checkout failed with "Timed out
    # while attempting to connect to ephemeral Prefect API server".
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")


def register(sub: argparse._SubParsersAction) -> None:
    from ipr_cli.main import add_config_args

    run = sub.add_parser("run", help="run the IPR pipeline (a Prefect flow)", description="Run the IPR pipeline as a Prefect flow: against PREFECT_API_URL if set, else a local ephemeral Prefect. Finished stages with the same identity (declared config reads, inputs, code) are reused, also from other runs under the same storage root.")
    add_config_args(run)
    run.set_defaults(func=_run)
    resume = sub.add_parser("resume", help="rerun a run with its saved config, recomputing only what is missing", description="Resume a run: reload RUN/config.json and run again; up-to-date stages are skipped.")
    resume.add_argument("run", help="the run folder (e.g. ./artifacts/ipr-demo or s3://bucket/prefix/ipr-demo)")
    resume.set_defaults(func=_resume)
    status = sub.add_parser("status", help="stage-by-stage completeness of a run, from its manifests", description="List each stage of a run as done or MISSING, from its manifests. Exit status 0 when every stage is complete, 1 when any is missing.")
    status.add_argument("run", help="the run folder")
    status.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    status.set_defaults(func=_status)
    report = sub.add_parser("report", help="print the per-iteration table of a run and its best model", description="Print the per-model table of a run (held-out success and reward, pairs, losses), then the best model (highest held-out mean reward; SFT and the iterations compete, as in the flow) and its checkpoint.")
    report.add_argument("run", help="the run folder")
    report.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    report.set_defaults(func=_report)
    explain = sub.add_parser("explain", help="say why each stage of a run would (or would not) be recomputed", description="Compare what each stage would read now (the run's saved config, or -c/--set) with what its artifact was made from: changed config reads, input contents, code version.")
    explain.add_argument("run", help="the run folder")
    explain.add_argument("stage", nargs="?", help="a stage name (e.g. explore) or artifact path (e.g. iter-01/explore/shard-000); default: all")
    add_config_args(explain, what="compare against this config instead of the run's saved one")
    explain.set_defaults(func=_explain)


def _go(cfg: IPRConfig) -> int:
    from ipr_core.pipeline import check

    check(cfg)  # before a Prefect server starts or any stage runs
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
    """The run's saved config, pointed at the folder given: a run folder that was
    moved or copied is resumed, listed and reported where it is now."""
    folder = store.normalize_uri(run)
    uri = store.join(folder, "config.json")
    try:
        data = json.loads(store.read_bytes(uri))
    except store.ArtifactNotFound:
        raise store.ArtifactNotFound(f"{uri} not found: is {run} a run folder?") from None
    root, name = folder.rsplit("/", 1)
    return config_from_json({**data, "run_name": name, "storage": {**data.get("storage", {}), "root": root}})


def _resume(args: argparse.Namespace) -> int:
    return _go(_saved_config(args.run))


def _run_nodes(cfg: IPRConfig):
    from ipr_core.pipeline import run_plan, run_uri

    run = run_uri(cfg)
    return run, run_plan(cfg, run)


def _stage_states(run: str, nodes) -> list[dict]:
    """Per DAG node: its stage, key, URI, whether its artifact is complete, and its rows (None for checkpoints)."""
    out = []
    for n in nodes:
        uri = store.join(run, n.key)
        m = store.read_manifest(uri)
        ok = m is not None and store.exists(uri)
        out.append({"stage": n.stage, "key": n.key, "uri": uri, "done": ok, "rows": m.rows if ok and m.kind != "checkpoint" else None})
    return out


def _status(args: argparse.Namespace) -> int:
    run, nodes = _run_nodes(_saved_config(args.run))
    stages = _stage_states(run, nodes)
    done = sum(s["done"] for s in stages)
    if args.json:
        print(json.dumps({"run": run, "complete": done, "total": len(stages), "stages": stages}, indent=2))
    else:
        for s in stages:
            rows = "" if s["rows"] is None else f"{s['rows']} rows"
            print(f"{'done' if s['done'] else 'MISSING':<8} {s['stage']:<15} {s['key']:<28} {rows:<12} {s['uri']}")
        print(f"{done}/{len(stages)} stages complete")
    return 0 if done == len(stages) else 1


def _names(models: list[str]) -> str:
    return models[0] if len(models) == 1 else f"{', '.join(models[:-1])} and {models[-1]}"


def best_model(run: str, nodes, rows: list[dict]) -> tuple[dict | None, str | None]:
    """The best model of ``rows`` as {"model", "uri", "mean_reward"}, and a note (or None).

    As in the flow: SFT and the iterations compete (the untrained base does not),
    the highest held-out mean reward wins, and on a tie the earliest is kept."""
    scored = [r for r in rows if isinstance(r.get("mean_reward"), (int, float))]
    trained = [r for r in scored if r["model"] != "base"]
    if not trained:
        return None, "no trained model evaluated yet"
    best = trained[0]
    for r in trained[1:]:
        if r["mean_reward"] > best["mean_reward"]:
            best = r
    ev = next(n for n in nodes if n.stage == "evaluate" and dict(n.params)["tag"] == best["model"])
    reward = best["mean_reward"]
    notes = []
    tied = [r["model"] for r in trained if r["mean_reward"] == reward]
    if len(tied) > 1:
        notes.append(f"tie between {_names(tied)} at {reward:.3f}: the earliest, {best['model']}, is kept")
    iterations = [r for r in trained if r["model"] != "sft"]
    if best["model"] == "sft":
        notes.append("no iteration beat SFT" if iterations else "no iteration evaluated yet")
    base = next((r for r in scored if r["model"] == "base"), None)
    if base is not None and base["mean_reward"] > reward:
        notes.append(f"the untrained base model scored higher ({base['mean_reward']:.3f})")
    out = {"model": best["model"], "uri": ev.call(run).inputs["model_uri"], "mean_reward": reward}
    return out, "; ".join(notes) or None


def _report(args: argparse.Namespace) -> int:
    from ipr_core.pipeline.summary import result_rows
    from ipr_core.report import iteration_table

    run, nodes = _run_nodes(_saved_config(args.run))
    rows = result_rows(run, nodes)
    best, note = best_model(run, nodes, rows) if rows else (None, "no evaluations yet")
    if args.json:
        print(json.dumps({"run": run, "rows": rows, "best": best, "note": note}, indent=2))
        return 0 if rows else 1
    if not rows:
        print(f"no evaluations yet in {run}", file=sys.stderr)
        return 1
    print(iteration_table(rows))
    if best is not None:
        print(f"best: {best['model']} (mean reward {best['mean_reward']:.3f}) at {best['uri']}")
    if note:
        print(f"note: {note}")
    return 0


def _explain(args: argparse.Namespace) -> int:
    from ipr_core.pipeline.explain import explain

    saved = _saved_config(args.run)
    cfg = load_config(args.config, args.overrides, base=saved.model_dump(mode="json") if args.config is None else None)
    from ipr_core.pipeline import run_plan, run_uri

    run = run_uri(saved)  # where the artifacts are, whatever the compared config's root says
    nodes = run_plan(cfg, run)
    verdicts = [v for v in explain(cfg, run, nodes) if args.stage in (None, v.stage, v.key)]
    if not verdicts:
        raise ValueError(f"no stage {args.stage!r} in {run} (try a stage name such as explore, or an artifact path such as iter-01/pairs)")
    for v in verdicts:
        print(f"{v.state:<10} {v.key}")
        for r in v.reasons:
            print(f"           {r}")
    stale = sum(v.state != "up to date" for v in verdicts)
    print(f"{stale}/{len(verdicts)} stages would be recomputed")
    return 0
