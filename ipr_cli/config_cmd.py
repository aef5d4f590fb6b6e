"""`ipr config show`: the validated config, defaults filled in."""

from __future__ import annotations

import argparse
import json

import yaml

from ipr_core.config import IPRConfig, load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show or check a config", description="Show or check an IPR config.")
    s = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    show = s.add_parser("show", help="print the validated config (YAML), with defaults and overrides applied")
    from ipr_cli.main import add_config_args

    add_config_args(show)
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=_show)
    schema = s.add_parser("schema", help="print every field with its description and default")
    schema.set_defaults(func=_schema)


def _show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    data = cfg.model_dump(mode="json")
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    print(f"# config digest: {cfg.digest()}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    def walk(model: type, prefix: str) -> None:
        for name, f in model.model_fields.items():
            ann = f.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann, f"{prefix}{name}.")
            else:
                default = f.get_default(call_default_factory=True)
                print(f"{prefix}{name} = {default!r}\n    {f.description}")

    walk(IPRConfig, "")
    return 0
