"""`ipr config show` (the validated config, defaults filled in), `ipr config check` (the pre-run checks alone), `ipr config schema`."""

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
    check = s.add_parser("check", help="run the checks `ipr run` makes before any work (config, environment, model, storage root, cluster), and nothing else", description="Validate a run config (or an experiment file, with --experiment) and check what a run would need: the environment and its options, the base model, the storage root (writable; object-store credentials and endpoint), the Dask scheduler. Exit 0 when all pass, 2 with one `ipr: error:` line otherwise.")
    add_config_args(check)
    check.add_argument("--experiment", metavar="FILE", help="check every run of this experiment file instead")
    check.set_defaults(func=_check)
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


def _check(args: argparse.Namespace) -> int:
    from ipr_core.pipeline import check, run_uri

    if args.experiment:
        from ipr_core.experiment import expand, load_experiment

        cfgs = [r.cfg for r in expand(load_experiment(args.experiment, args.overrides))]
    else:
        cfgs = [load_config(args.config, args.overrides)]
    for cfg in cfgs:
        check(cfg)
        print(f"ok: {run_uri(cfg)}")
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
