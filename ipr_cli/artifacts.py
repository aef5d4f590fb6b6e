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
        print(f"{i.uri:<{width}}  {i.kind or '-':<12} {rows:>8}  {'complete' if i.complete else 'INCOMPLETE':<10} {created}")
    return 0
