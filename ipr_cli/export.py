"""`ipr export RUN [--iteration best|N] --out DIR [--force]`: a Hub-ready model folder and the run's datasets (docs/export.md)."""

from __future__ import annotations

import argparse
import shlex


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a Hub-ready model folder (with a model card) and the run's datasets",
        description="Export one checkpoint of a run as a Hugging Face model folder (weights, config, generation config, tokenizer, "
        "README.md model card; no _MANIFEST.json) under OUT/model, and the run's SFT data, pairs and evaluations as Parquet under "
        "OUT/datasets/{sft,pairs,eval} (each readable with datasets.load_dataset('parquet', data_dir=...)). Nothing is written "
        "unless every check passes, and OUT appears whole or not at all. See docs/export.md.",
    )
    p.add_argument("run", help="the run folder (e.g. ./artifacts/ipr-demo or s3://bucket/prefix/ipr-demo)")
    p.add_argument("--iteration", default="best", metavar="best|N", help="which checkpoint: best (default: the run's best model, chosen as `ipr report` chooses it), N for iteration N's model, 0 for the SFT model")
    p.add_argument("--out", required=True, metavar="DIR", help="a local folder: absent or empty (or any folder with --force)")
    p.add_argument("--force", action="store_true", help="replace OUT if it is not empty")
    p.set_defaults(func=_export)


def _command(args: argparse.Namespace) -> str:
    """The export command as given (the model card records it)."""
    return f"ipr export {shlex.quote(args.run)} --iteration {shlex.quote(str(args.iteration))} --out {shlex.quote(args.out)}" + (" --force" if args.force else "")


def _export(args: argparse.Namespace) -> int:
    from ipr_cli.pipeline import DEMO_CONFIG, _saved_config
    from ipr_core.export import export_run
    from ipr_core.pipeline import run_uri

    cfg = _saved_config(args.run)
    res = export_run(cfg, run_uri(cfg), args.out, args.iteration, force=args.force, command=_command(args), base_file=DEMO_CONFIG)
    print(f"exported {res.choice.tag} of {run_uri(cfg)}: {res.choice.reason}")
    total = sum(size for _, size in res.model_files)
    print(f"  model/     {len(res.model_files)} files, {total / 1e6:.1f} MB: {', '.join(name for name, _ in res.model_files)}")
    for name, files in res.datasets.items():
        print(f"  datasets/{name + '/':<7}" + ", ".join(f"{f} ({rows} rows)" for f, rows in files.items()))
    print("  datasets/README.md (dataset card)")
    print(f"wrote {res.out}")
    return 0
