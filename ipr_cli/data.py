"""`ipr data tasks|experts`: task listings and expert trajectory datasets."""

from __future__ import annotations

import argparse
import time
from typing import Any

import yaml

from ipr_core import store
from ipr_core.envs.base import available_envs, make_env

_EPILOG = """environment options (--option KEY=VALUE, values parsed as YAML):
  babyai              level=BabyAI-GoToObj-v0 (also GoToRedBallNoDists, GoToLocalS8N2, GoToLocal, ...)
  textworld_express   game=twc|cookingworld|coin|mapreader|arithmetic|sorting|simonsays|peckingorder
                      game_params=numLocations=1,numItemsToPutAway=2   heap=256m
  scienceworld        task_names=[boil,melt] (or boil,melt)   simplification=easy   heap=768m
                      include_stochastic=true   valid_actions=true

examples:
  ipr data tasks --env babyai --split test --n 5
  ipr data experts --env babyai --option level=BabyAI-GoToLocalS8N2-v0 --n 200 --out ./artifacts/data/experts
  ipr data experts --env scienceworld --option task_names=[find-animal] --n 20 --out s3://bucket/sw/experts
"""


def _add_env_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="babyai", help=f"environment name from the registry: {', '.join(available_envs())} (default: babyai)")
    p.add_argument("--split", default="train", help="task split: train, dev or test (default: train)")
    p.add_argument("--n", type=int, default=None, help="number of tasks (required for babyai, which generates tasks on demand; default: the whole split)")
    p.add_argument("--seed", type=int, default=0, help="run seed: the same seed lists the same tasks (default: 0)")
    p.add_argument("--max-steps", type=int, default=None, help="episode step limit (default: the adapter's)")
    p.add_argument("--option", "-o", dest="options", action="append", default=[], metavar="KEY=VALUE", help="adapter option, repeatable (see below)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list tasks, build expert trajectory datasets", description="Environment data: task listings and expert trajectories (Parquet + manifest).")
    s = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    tasks = s.add_parser("tasks", help="print the task ids of a split", description="Print the tasks of a split (id, seed, metadata), deterministically for --seed.", epilog=_EPILOG, formatter_class=fmt)
    _add_env_args(tasks)
    tasks.add_argument("--out", default=None, metavar="URI", help="also write the listing as a 'tasks' dataset at URI")
    tasks.set_defaults(func=_tasks)
    experts = s.add_parser(
        "experts",
        help="run the expert on every task and write a trajectory dataset",
        description="Run the environment's expert (BabyAI bot, gold action sequences) on each task of a split and write the replayed "
        "trajectories as a Parquet 'trajectories' dataset with a manifest. Prints how many experts succeeded; exits 1 if none did.",
        epilog=_EPILOG,
        formatter_class=fmt,
    )
    _add_env_args(experts)
    experts.add_argument("--out", required=True, metavar="URI", help="dataset folder: a local path, s3://bucket/prefix or any fsspec URL")
    experts.set_defaults(func=_experts)


def parse_options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {item!r} is not of the form KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def _env(args: argparse.Namespace):
    options = parse_options(args.options)
    try:
        return make_env(args.env, options, args.max_steps), options
    except TypeError as e:  # an option the adapter does not take
        raise ValueError(f"environment {args.env!r} rejected options {options}: {e}") from None


def _tasks(args: argparse.Namespace) -> int:
    from ipr_core.pipeline import Rows
    from ipr_core.pipeline.runner import publish

    env, _ = _env(args)
    try:
        tasks = env.list_tasks(args.split, n=args.n, seed=args.seed)
    finally:
        env.close()
    for t in tasks:
        print(f"{t.task_id}\tseed={t.seed}\t{dict(t.meta)}")
    if args.out:
        uri = store.normalize_uri(args.out)
        publish(uri, "tasks", Rows([t.to_row() for t in tasks]), meta={"env": args.env, "split": args.split, "seed": args.seed})
        print(f"wrote {len(tasks)} tasks to {uri}")
    return 0


def _experts(args: argparse.Namespace) -> int:
    from ipr_core.experts import collect_experts, summarize_experts
    from ipr_core.pipeline import Rows
    from ipr_core.pipeline.runner import publish

    t0 = time.time()
    env, options = _env(args)
    try:
        tasks = env.list_tasks(args.split, n=args.n, seed=args.seed)
        trajs = collect_experts(env, tasks, run_seed=args.seed)
    finally:
        env.close()
    summary = summarize_experts(trajs)
    uri = store.normalize_uri(args.out)
    meta = {"env": args.env, "split": args.split, "n": len(tasks), "seed": args.seed, "options": options, "max_steps": args.max_steps, "summary": summary.to_dict()}
    publish(uri, "trajectories", Rows([t.to_row() for t in trajs]), meta=meta, wall_s=time.time() - t0)
    print(
        f"{summary.successes}/{summary.n} experts succeeded ({summary.errors} errors, mean reward {summary.mean_reward:.3f}, "
        f"mean {summary.mean_steps:.1f} steps) -> {uri}"
    )
    for t in trajs:
        if t.error:
            print(f"  {t.task.task_id}: {t.error}")
    return 0 if summary.successes else 1
