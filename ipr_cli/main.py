"""`ipr`: the command line of ipr-flow.

Each command group lives in its own module with a ``register(subparsers)``
function; this module only wires them together. Errors from bad input print
one clear line (no traceback) and exit with status 2. A reader that leaves
early (`ipr ... | head`) ends the command quietly with status 0.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ipr_core import __version__
from ipr_core.config import ConfigError

# Command-group modules, in --help order.
GROUPS = ["ipr_cli.config_cmd", "ipr_cli.artifacts", "ipr_cli.data", "ipr_cli.model", "ipr_cli.pipeline", "ipr_cli.export"]


def add_config_args(p: argparse.ArgumentParser, what: str = "default: built-in defaults") -> None:
    p.add_argument("--config", "-c", metavar="FILE", help=f"YAML config file ({what})")
    p.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. --set pipeline.iterations=2 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ipr", description="IPR (Iterative step-level Process Refinement) for LLM agents, as a Prefect 3 workflow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"ipr-flow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in GROUPS:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue  # group not built yet
            raise
        module.register(sub)
    return parser


class _RunFormatter(logging.Formatter):
    """Names the Prefect task or flow run a line comes from (Prefect attaches them to its records)."""

    def format(self, record: logging.LogRecord) -> str:
        where = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", None)
        line = super().format(record)
        return f"{line} [{where}]" if where else line


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_RunFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[handler])
    for noisy in ("httpx", "httpcore", "urllib3", "distributed", "botocore", "aiobotocore", "s3fs"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # per-request lines drown the run's own
    from ipr_core.schemas import SchemaError
    from ipr_core.store import StoreError

    try:
        rc = args.func(args)
    except (ConfigError, SchemaError, StoreError, ValueError, FileNotFoundError) as e:
        print(f"ipr: error: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            # Flush here, not at interpreter exit: there a closed pipe prints
            # "Exception ignored ... BrokenPipeError" that nothing can catch.
            # Also on SystemExit (--help, --version).
            sys.stdout.flush()
    except BrokenPipeError:  # `ipr ... | head`: the reader left; not an error
        # What is still buffered goes nowhere, so the exit-time flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


# Commands that run Prefect flows exit normally: Prefect flushes its API log
# handler and stops a local server in exit handlers.
_PREFECT_COMMANDS = {"run", "resume", "experiment"}


def cli() -> None:
    """The ``ipr`` executable. Other commands end with ``os._exit`` once their
    output is flushed: pyarrow's native thread pools, torn down at interpreter
    exit, occasionally abort the process ("terminate called without an active
    exception", SIGABRT) after the work is done, which would turn a finished
    ``ipr status`` into exit code -6."""
    rc = main()
    if _PREFECT_COMMANDS.isdisjoint(a for a in sys.argv[1:] if not a.startswith("-")):
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (BrokenPipeError, ValueError):
                pass
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    cli()
