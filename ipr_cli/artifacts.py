"""`ipr artifacts ls URI`: datasets and checkpoints below a URI, complete or not."""

from __future__ import annotations

import argparse
import datetime as dt

from ipr_core import store


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("artifacts", help="inspect stored artifacts", description="Inspect artifacts in a store (local path, s3://, any fsspec URL).")
    s = p.add_subparsers(dest="artifacts_command", metavar="SUBCOMMAND", required=True)
    ls = s.add_parser("ls", help="list datasets below URI: kind, rows, complete/incomplete")
    ls.add_argument("uri", help="a local folder, s3://bucket/prefix or any fsspec URL")
    ls.set_defaults(func=_ls)
    verify = s.add_parser("verify", help="re-hash every file below URI against its manifest; list damaged and stale artifacts (exit 1 if any)")
    verify.add_argument("uri", help="a run folder, a storage root or one artifact")
    verify.set_defaults(func=_verify)


def _ls(args: argparse.Namespace) -> int:
    infos = store.ls(store.normalize_uri(args.uri))
    if not infos:
        print(f"no datasets below {args.uri}")
        return 0
    width = max(len(i.uri) for i in infos)
    print(f"{'URI':<{width}}  {'KIND':<12} {'ROWS':>8}  {'STATUS':<10} CREATED")
    for i in infos:
        created = dt.datetime.fromtimestamp(i.created_at).strftime("%Y-%m-%d %H:%M:%S") if i.created_at else "-"
        rows = "-" if i.rows is None or i.kind == "checkpoint" else str(i.rows)
        state = "DAMAGED" if i.problem else "complete" if i.complete else "INCOMPLETE"
        print(f"{i.uri:<{width}}  {i.kind or '-':<12} {rows:>8}  {state:<10} {created}" + (f"  {i.problem}" if i.problem else ""))
    return 0


def _check(info: store.DatasetInfo) -> tuple[str, list[str]]:
    """(state, reasons) of one artifact: ok, DAMAGED (its files), STALE (its inputs changed) or INCOMPLETE."""
    if info.problem:
        return "DAMAGED", [info.problem]
    if not info.complete:
        return "INCOMPLETE", ["no manifest: absent or still being written"]
    damage = store.problems(info.uri)
    if damage:
        return "DAMAGED", damage
    stale = store.stale_inputs(info.uri)
    return ("STALE", stale) if stale else ("ok", [])


def _verify(args: argparse.Namespace) -> int:
    infos = store.ls(store.normalize_uri(args.uri))
    bad = 0
    for i in infos:
        state, reasons = _check(i)
        bad += state != "ok"
        print(f"{state:<10} {i.uri}")
        for line in reasons:
            print(f"           {line}")
    print(f"{len(infos) - bad}/{len(infos)} artifacts intact and current")
    return 1 if bad else 0
