"""What IPR costs over ETO, from the same SFT model, in one run.

Three runs of one config share their upstream stages (experts, SFT, base/SFT
evaluations) by stage identity, and differ in what they compute per iteration:

- eto: outcome pairs only (no expert or agent MC: ETO uses no step reward);
- ipr-naive: IPR with every exploration branch scored by agent MC
  (``mc.score_all_branches=true``: what IPR cost before branches that cannot
  make a pair were skipped);
- ipr: IPR as configured (branches that cannot make a pair get no rollouts).

The pairs of ipr and ipr-naive are the same (the skip is exact), so from
iteration 2 on their exploration is the same artifact and only agent MC
differs. Each run's cost counts every stage it needs as if it ran alone
(copied stages carry their original wall time): stage wall time, generated
tokens and MC rollouts; per iteration, the share of ipr-naive's agent MC
rollouts that ipr ran. Prints a table and the ratios IPR/ETO; no Prefect.

Measured results: docs/performance.md.

    .venv/bin/python bench/ipr_cost.py [--config configs/demo.yaml] [--set key=value ...]
    .venv/bin/python bench/ipr_cost.py --set env.options.level=BabyAI-GoToLocalS8N2-v0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipr_core import store  # noqa: E402
from ipr_core.config import load_config  # noqa: E402
from ipr_core.experiment import PAPER_VARIANTS, run_cost  # noqa: E402
from ipr_core.pipeline import run_local, run_plan, run_uri  # noqa: E402

VARIANTS = {"eto": PAPER_VARIANTS["eto"], "ipr-naive": ["mc.score_all_branches=true"], "ipr": []}


def _agent_mc(run: str, nodes, k: int) -> int:
    ms = [store.read_manifest(store.join(run, n.key)) for n in nodes if n.stage == "agent-mc" and n.iteration == k]
    return sum(int(m.meta.get("rollouts", 0)) for m in ms if m is not None)


def measure(config: str, overrides: list[str], root: str) -> dict:
    out = {}
    for name, extra in VARIANTS.items():
        cfg = load_config(config, [*overrides, *extra, f"storage.root={root}", f"run_name={name}"])
        t0 = time.perf_counter()
        run_local(cfg)
        run = run_uri(cfg)
        nodes = run_plan(cfg, run)
        cost = run_cost(run, nodes)
        per_iter = [_agent_mc(run, nodes, k) for k in range(1, cfg.pipeline.iterations + 1)]
        out[name] = {**cost, "agent_mc_per_iteration": per_iter, "process_s": round(time.perf_counter() - t0, 1)}
        print(f"{name}: {json.dumps(out[name])}", flush=True)
    return out


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def report(res: dict) -> str:
    eto = res["eto"]
    lines = ["| run | stage wall time (s) | generated tokens | MC rollouts | agent MC rollouts per iteration | wall / ETO | tokens / ETO |", "|---|---|---|---|---|---|---|"]
    for name, c in res.items():
        lines.append(f"| {name} | {c['wall_s']:.0f} | {c['generated_tokens'] or 0:,} | {c['mc_rollouts']:,} | {', '.join(map(str, c['agent_mc_per_iteration']))} | {_ratio(c['wall_s'], eto['wall_s'])} | {_ratio(c['generated_tokens'], eto['generated_tokens'])} |")
    naive, ipr = res["ipr-naive"]["agent_mc_per_iteration"], res["ipr"]["agent_mc_per_iteration"]
    share = ", ".join(f"iteration {k}: {b / a:.0%}" if a else f"iteration {k}: -" for k, (a, b) in enumerate(zip(naive, ipr), 1))
    lines.append(f"\nShare of the naive agent MC rollouts that ipr ran: {share}; all MC: {res['ipr']['mc_rollouts'] / max(res['ipr-naive']['mc_rollouts'], 1):.0%}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--root", help="artifact root (default: a temporary folder)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ipr-cost-") as tmp:
        res = measure(args.config, args.overrides, args.root or tmp)
    print(report(res))


if __name__ == "__main__":
    main()
