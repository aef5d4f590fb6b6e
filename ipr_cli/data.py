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
    games = s.add_parser(
        "alfworld-games",
        help="generate ALFWorld games (official layout) from what the alfworld package ships",
        description="Write ALFWorld games under OUT/json_2.1.1/{train,valid_seen,valid_unseen}/ (the layout of the official download, "
        "so `--option data=OUT` or ALFWORLD_DATA=OUT loads them), deterministically for --seed. Every game is won by ALFWorld's "
        "handcoded expert before it is kept. valid_unseen uses only FloorPlans train and valid_seen never use. These are the "
        "ALFWorld engine on generated tasks, not the benchmark's games: reports label them as generated. Needs the alfworld extra.",
        epilog="examples:\n  ipr data alfworld-games --out ./alfworld-games --n 20\n  ipr data alfworld-games --out ./alfworld-games "
        "--n train=200,valid_seen=40,valid_unseen=40 --task-types pick_and_place_simple,pick_two_obj_and_place --grammar 0.3",
        formatter_class=fmt,
    )
    games.add_argument("--out", required=True, metavar="DIR", help="folder to write; must not hold games already")
    games.add_argument("--seed", type=int, default=0, help="generation seed: the same seed writes byte-identical games (default: 0)")
    games.add_argument("--n", default="10", metavar="N|SPLIT=N,...", help="games per split: one number for each of the three, or e.g. train=100,valid_unseen=20 (default: 10)")
    games.add_argument("--task-types", default=None, metavar="T1,T2", help="task types to generate (default: all six)")
    games.add_argument("--scenes", default=None, metavar="N1,N2", help="FloorPlan numbers train and valid_seen draw from (default: all but the unseen ones)")
    games.add_argument("--grammar", default="0.4", choices=["0.4", "0.3"], help="surface text: alfworld 0.4 (move X to Y) or the 0.3 text the papers used (put X in/on Y) (default: 0.4)")
    games.add_argument("--max-expert-steps", type=int, default=200, help="drop games whose expert needs more steps (default: 200, the expert's own cap)")
    games.add_argument("--workers", type=int, default=1, help="processes solving games (default: 1)")
    games.set_defaults(func=_alfworld_games)


def _split_counts(text: str) -> int | dict[str, int]:
    try:
        if "=" not in text:
            return int(text)
        return {k.strip(): int(v) for k, v in (part.split("=", 1) for part in text.split(",") if part.strip())}
    except ValueError:
        raise ValueError(f"--n {text!r}: expected a number or SPLIT=N,... (splits: train, valid_seen, valid_unseen)") from None


def _alfworld_games(args: argparse.Namespace) -> int:
    import json
    import os
    import shutil
    from pathlib import Path

    out = Path(args.out)
    if (out / "json_2.1.1").exists():
        raise ValueError(f"--out {out}: already holds games (json_2.1.1/); choose an empty folder")
    try:
        from ipr_core.envs.alfworld_gen import GEN_VERSION, generate_games
    except ImportError as e:
        raise ValueError(f"ALFWorld games need the alfworld extra: pip install 'ipr-flow[alfworld]' ({e})") from None
    n = _split_counts(args.n)
    types = [t for t in args.task_types.split(",") if t] if args.task_types else None
    try:
        scenes = [int(x) for x in args.scenes.split(",") if x] if args.scenes else None
    except ValueError:
        raise ValueError(f"--scenes {args.scenes!r}: expected FloorPlan numbers, e.g. 1,2,301") from None
    # Written next to the destination and renamed at the end: an interrupted
    # run leaves no half-written game folder where the adapter would look.
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    try:
        games = generate_games(tmp / "json_2.1.1", seed=args.seed, n=n, task_types=types, scenes=scenes, grammar=args.grammar,
                               max_steps=args.max_expert_steps, workers=args.workers)
        listing = {"generator": GEN_VERSION, "seed": args.seed, "grammar": args.grammar, "n": n, "games": [g.path for g in games]}
        (tmp / "json_2.1.1").rename(out / "json_2.1.1")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (out / "games.json").write_text(json.dumps(listing, indent=1, sort_keys=True) + "\n")
    by_split: dict[str, int] = {}
    for g in games:
        by_split[g.split] = by_split.get(g.split, 0) + 1
    counts = ", ".join(f"{k} {v}" for k, v in by_split.items())
    print(f"wrote {len(games)} generated ALFWorld games ({counts}) in {time.time() - t0:.0f} s -> {out}/json_2.1.1")
    return 0


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
