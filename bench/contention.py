"""Pipelines that share a machine: one run alone, then three at once, in one run.

Each run is its own process (``run_local``: no Prefect) with its own storage
root, so nothing is shared but the cores. For every setting asked for
(``--settings``: OpenMP's wait policy ``active`` / ``passive``, its spin count
``spin=N``, torch threads per run ``threads=N``, glibc's mmap and trim
thresholds ``malloc=BYTES``, or several joined by ``+``), the bench runs the config
once alone and then three copies side by side (``--alone``: only the first), and prints per run: wall time,
slowdown against alone, and peak resident memory (``wait4``'s maxrss of that
process), and the SFT stage's training time of the run alone. A fair share of the cores would make each of three runs at most 3x
slower than alone. Same config and seed, so the four runs of a setting must
end with the same final checkpoint (another thread count may round floats
differently, so settings are not compared with each other).

Measured results: docs/performance.md.

    .venv/bin/python bench/contention.py [--config configs/demo.yaml] [--set key=value ...] [--settings default spin=300000 passive threads=1] [--alone]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_CHILD = """
import json, sys
from ipr_core.config import load_config
from ipr_core.pipeline import run_local
run_local(load_config(sys.argv[1] or None, json.loads(sys.argv[2])))
"""


RUN_NAME = "bench"


def _root(tmp: str, tag: str, i: int) -> str:
    """Storage root of run ``i`` of the runs tagged ``tag``; its run folder is ``_run_dir``."""
    return os.path.join(tmp, f"{tag}-{i}")


def _run_dir(tmp: str, tag: str, i: int) -> str:
    return os.path.join(_root(tmp, tag, i), RUN_NAME)


def _start(config: str, overrides: list[str], root: str, env: dict) -> subprocess.Popen:
    args = [*overrides, f"storage.root={root}", f"run_name={RUN_NAME}"]
    return subprocess.Popen([sys.executable, "-c", _CHILD, config, json.dumps(args)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _runs(config: str, overrides: list[str], env: dict, n: int, tmp: str, tag: str) -> list[dict]:
    """``n`` runs started together; per run its wall time and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    t0 = time.perf_counter()
    procs = {_start(config, overrides, _root(tmp, tag, i), env).pid: i for i in range(n)}
    out: list[dict] = [{} for _ in range(n)]
    while procs:
        pid, status, usage = os.wait4(-1, 0)
        if pid not in procs:
            continue
        i = procs.pop(pid)
        out[i] = {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024), "ok": os.waitstatus_to_exitcode(status) == 0}
    return out


def setting(text: str) -> tuple[list[str], dict[str, str]]:
    """``default``, ``passive`` / ``active`` (OMP_WAIT_POLICY), ``spin=N`` (GOMP_SPINCOUNT), ``threads=N``
    (pipeline.torch_threads), ``malloc=BYTES`` (glibc's MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_,
    which then win over ipr_core's own), or several joined by ``+``: overrides and environment."""
    overrides, env = [], {}
    for part in text.split("+"):
        if part in ("passive", "active"):
            env["OMP_WAIT_POLICY"] = part.upper()
        elif part.startswith("spin="):
            env["GOMP_SPINCOUNT"] = str(int(part.split("=", 1)[1]))
        elif part.startswith("threads="):
            overrides.append(f"pipeline.torch_threads={int(part.split('=', 1)[1])}")
        elif part.startswith("malloc="):
            env["MALLOC_MMAP_THRESHOLD_"] = env["MALLOC_TRIM_THRESHOLD_"] = str(int(part.split("=", 1)[1]))
        elif part != "default":
            raise SystemExit(f"bench/contention.py: error: unknown setting {part!r} (default, passive, active, spin=N, threads=N, malloc=BYTES, joined by +)")
    return overrides, env


def _sft_train_s(tmp: str, tag: str) -> float | None:
    """The SFT stage's training loop time in the run ``tag``-0 (its manifest)."""
    from ipr_core import store

    m = store.read_manifest(os.path.join(_run_dir(tmp, tag, 0), "sft", "model"))
    return None if m is None else m.meta.get("train_s")


def _digests(tmp: str, tag: str, n: int) -> list[str | None]:
    from ipr_core import store

    found = []
    for i in range(n):
        run = _run_dir(tmp, tag, i)
        models = sorted(p for p in Path(run).glob("iter-*/model")) or [Path(run) / "sft" / "model"]
        m = store.read_manifest(str(models[-1]))
        found.append(m.digest if m is not None else None)
    return found


def measure(config: str, overrides: list[str], settings: list[str], tmp: str, alone_only: bool = False) -> dict:
    """Per setting: one run alone, then three at once (slowdowns against that run alone)."""
    res = {}
    for name in settings:
        extra, env = setting(name)
        ov = [*overrides, *extra]
        alone = _runs(config, ov, env, 1, tmp, f"{name}-alone")
        three = [] if alone_only else _runs(config, ov, env, 3, tmp, f"{name}-three")
        digests = _digests(tmp, f"{name}-alone", 1) + _digests(tmp, f"{name}-three", len(three))
        res[name] = {
            "alone": {**alone[0], "sft_train_s": _sft_train_s(tmp, f"{name}-alone")}, "three": three,
            "slowdown": [round(r["wall_s"] / alone[0]["wall_s"], 2) for r in three], "same_model": len(set(digests)) == 1 and None not in digests, "digest": digests[0],
        }  # fmt: skip
        print(f"{name}: {json.dumps(res[name])}", flush=True)
        if not all(r["ok"] for r in [*alone, *three]):
            print(f"warning: a run with {name} failed: its figures are not comparable", flush=True)
    return res


def report(res: dict) -> str:
    lines = ["| setting | alone (s) | alone: SFT training (s) | alone peak RSS (MB) | three at once (s, each) | slowdown (each) | peak RSS of each (MB) | same final model (all runs) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in res.items():
        three = r["three"]
        walls = ", ".join(f"{x['wall_s']:.0f}" for x in three)
        slow = ", ".join(f"{x:.2f}x" for x in r["slowdown"])
        peaks = ", ".join(f"{x['peak_rss_mb']:,}" for x in three)
        same = "yes" if r["same_model"] else "NO"
        sft = r["alone"]["sft_train_s"]
        lines.append(f"| {name} | {r['alone']['wall_s']:.0f} | {'' if sft is None else f'{sft:.0f}'} | {r['alone']['peak_rss_mb']:,} | {walls} | {slow} | {peaks} | {same} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--settings", nargs="+", default=["default", "spin=300000", "passive", "threads=1"], help="what to compare: default, passive / active (OMP_WAIT_POLICY), spin=N (GOMP_SPINCOUNT), threads=N (pipeline.torch_threads), malloc=BYTES (glibc's mmap/trim thresholds), joined by +")
    ap.add_argument("--alone", action="store_true", help="only the run alone per setting (no three at once)")
    args = ap.parse_args()
    for name in args.settings:
        setting(name)  # a bad setting fails before any run
    with tempfile.TemporaryDirectory(prefix="ipr-contention-") as tmp:
        res = measure(args.config, args.overrides, args.settings, tmp, args.alone)
    print(report(res))


if __name__ == "__main__":
    main()
