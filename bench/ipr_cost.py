"""What IPR costs over ETO, from the same SFT model, in one run.

Six runs of one config, in four storage roots:

- root A: ``eto`` (outcome pairs only, explored from the task's start: no
  expert or agent MC, ETO uses no step reward) and ``ipr`` (IPR as configured:
  unpairable branches skipped, the step-reward memo on, per iteration only the
  expert steps the pairs compare get MC);
- root B: ``ipr-skip`` (skipping, no memo) and ``ipr-naive`` (every branch and
  every expert step scored, no memo: IPR's cost before any saving);
- root C: ``ipr-action-memo`` (``mc.memo_ignores_thoughts``: an estimate
  reused at the same state and action whatever the thought), with a memo of
  its own: its cost, and how far the approximation moves iteration 1's step
  rewards and pairs from ipr's exact ones;
- root D: ``ipr-experts-up-front`` (``mc.expert_steps=all``: every expert
  step scored once before iteration 1, as before the paired default).

Runs of one root share their upstream stages (experts, SFT, evaluations) by
stage identity; the memo is shared by a root's runs too, so the memo-less runs
live in a root of their own (training is deterministic: both roots' SFT models
are the same checkpoint, which the bench checks). The estimates, and so the
pairs, of ipr, ipr-skip, ipr-naive and ipr-experts-up-front are the same (the
skip, the memo and the paired expert MC are exact): the bench checks that they
end with the same models.
Each run's cost counts every stage it needs as if it ran alone (copied stages
carry their original wall time): generated tokens and MC rollouts; stage wall
time of its own stages, and of the whole run with the shared stages (experts,
SFT, base and SFT evaluations) charged at their median over the runs; per
iteration, the share of ipr-naive's agent MC rollouts that the others ran,
and how often the agent's scored step equalled the expert's.
Prints a table and the ratios to ETO; no Prefect.

Measured results: docs/performance.md.

    .venv/bin/python bench/ipr_cost.py [--config configs/demo.yaml] [--set key=value ...]
    .venv/bin/python bench/ipr_cost.py --set env.options.level=BabyAI-GoToLocalS8N2-v0 --variants eto ipr ipr-naive
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ipr_core import store  # noqa: E402
from ipr_core.config import load_config  # noqa: E402
from ipr_core.experiment import PAPER_VARIANTS, run_cost  # noqa: E402
from ipr_core.pipeline import run_local, run_plan, run_uri  # noqa: E402
from ipr_core.pipeline.dag import step_reward_keys  # noqa: E402

# name -> (overrides, root)
VARIANTS = {
    "eto": (PAPER_VARIANTS["eto"], "a"),
    "ipr": ([], "a"),
    "ipr-skip": (["mc.memo=false"], "b"),
    "ipr-naive": (["mc.memo=false", "mc.score_all_branches=true"], "b"),
    "ipr-action-memo": (["mc.memo_ignores_thoughts=true"], "c"),
    "ipr-experts-up-front": (["mc.expert_steps=all"], "d"),
}
PER_ITERATION = ("rollouts", "rollouts_reused", "estimates", "same_step_as_expert", "same_action_as_expert", "skipped_targets", "skipped_by_expert_reward")


def _mc_meta(run: str, nodes, k: int | None, stage: str = "agent-mc") -> dict[str, int]:
    ms = [store.read_manifest(store.join(run, n.key)) for n in nodes if n.stage == stage and n.iteration == k]
    return {key: sum(int(m.meta.get(key, 0)) for m in ms if m is not None) for key in PER_ITERATION}


def measure(config: str, overrides: list[str], root: str, names: list[str], compute: bool = True) -> dict:
    out = {}
    for name in names:
        extra, sub = VARIANTS[name]
        cfg = load_config(config, [*overrides, *extra, f"storage.root={store.join(root, sub)}", f"run_name={name}"])
        t0 = time.perf_counter()
        if compute:  # else: report on what the root already holds
            run_local(cfg)
        run = run_uri(cfg)
        nodes = run_plan(cfg, run)
        cost = run_cost(run, nodes)
        its = range(1, cfg.pipeline.iterations + 1)
        per_iter = [_mc_meta(run, nodes, k) for k in its]
        # expert MC: up front (iteration None) or per iteration (mc.expert_steps=paired)
        expert = [_mc_meta(run, nodes, None, "expert-mc")["rollouts"], *(_mc_meta(run, nodes, k, "expert-mc-paired")["rollouts"] for k in its)]
        digest = {m: store.digest(store.join(run, m)) for m in ("sft/model", f"iter-{its[-1]:02d}/model")}
        shared = _shared_wall(run, nodes)
        out[name] = {**cost, "shared_wall_s": shared, "own_wall_s": round(cost["wall_s"] - shared, 1), "agent_mc": per_iter, "expert_mc": expert, "digests": digest, "process_s": round(time.perf_counter() - t0, 1)}
        print(f"{name}: {json.dumps(out[name])}", flush=True)
    if {"ipr", "ipr-action-memo"} <= set(out):
        cfgs = [load_config(config, [*overrides, *VARIANTS[n][0], f"storage.root={store.join(root, VARIANTS[n][1])}", f"run_name={n}"]) for n in ("ipr", "ipr-action-memo")]
        out["ipr-action-memo"]["moved"] = _moved(*((c, run_uri(c)) for c in cfgs))
    if len({r["digests"]["sft/model"] for r in out.values()}) != 1:
        print("warning: the runs' SFT models differ (training is not deterministic here): the comparison is not from the same SFT model", flush=True)
    exact = {n: out[n]["digests"] for n in ("ipr", "ipr-skip", "ipr-naive", "ipr-experts-up-front") if n in out}
    same = len({json.dumps(d, sort_keys=True) for d in exact.values()}) == 1
    print(f"exact variants ({', '.join(exact)}) end with the same models: {same}", flush=True)
    return out


SHARED = ("experts", "eval-tasks", "base-model", "sft")  # + the base and SFT evaluations: the same work in every variant


def _shared_wall(run: str, nodes) -> float:
    """Stage wall time of the stages every variant shares (experts, SFT, the base and
    SFT evaluations: same digests); the rest of run_cost's wall time is the variant's own
    (the iterations, expert MC up front)."""
    shared = [n for n in nodes if n.stage in SHARED or (n.stage == "evaluate" and n.iteration <= 0)]
    ms = [store.read_manifest(store.join(run, n.key)) for n in shared]
    return round(sum(m.timings.get("wall_s", 0.0) for m in ms if m is not None), 1)


def _moved(exact: tuple, approx: tuple) -> dict:
    """Iteration 1 under the approximation vs exact: step rewards (expert and agent) that changed,
    their mean absolute change, and the pairs that differ (same exploration: both start from the SFT model)."""
    rewards = [
        {(r["branch_id"], r["step"]): r["reward"] for key in step_reward_keys(run_plan(cfg, run), 1) for r in store.read_rows(store.join(run, key), "step_rewards")}
        for cfg, run in (exact, approx)
    ]  # fmt: skip
    common = sorted(set(rewards[0]) & set(rewards[1]))
    diffs = [abs(rewards[0][k] - rewards[1][k]) for k in common]
    a, b = ({p["pair_id"]: (p["chosen"], p["rejected"]) for p in store.read_rows(store.join(run, "iter-01/pairs"), "pairs")} for _, run in (exact, approx))
    return {
        "estimates": len(common), "changed": sum(d > 0 for d in diffs), "mae": round(sum(diffs) / len(diffs), 4) if diffs else None,
        "pairs_exact": len(a), "pairs_approx": len(b), "pairs_different": len(set(a) ^ set(b)) + sum(a[k] != b[k] for k in set(a) & set(b)),
    }  # fmt: skip


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def report(res: dict) -> str:
    eto = res["eto"]
    # The shared stages are the same work in every root, but their wall time moves between roots
    # (SFT took 95-186 s for one checkpoint): every run is charged their median, so the ratios
    # compare what the variants do differently.
    shared = statistics.median(c["shared_wall_s"] for c in res.values())
    lines = [
        f"Shared stages (experts, SFT, base and SFT evaluations; the same digests in every root): {', '.join(str(c['shared_wall_s']) for c in res.values())} s; "
        f"each run below is charged their median, {shared:.0f} s.", "",
        "| run | own stages (s) | whole run (s) | generated tokens | MC rollouts | expert MC rollouts (up front; per iteration) | agent MC rollouts per iteration "
        "| own / ETO | whole / ETO | tokens / ETO |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, c in res.items():
        per_iter = ", ".join(str(a["rollouts"]) for a in c["agent_mc"])
        expert = f"{c['expert_mc'][0]}; {', '.join(map(str, c['expert_mc'][1:]))}"
        whole, eto_whole = shared + c["own_wall_s"], shared + eto["own_wall_s"]
        lines.append(
            f"| {name} | {c['own_wall_s']:.0f} | {whole:.0f} | {c['generated_tokens'] or 0:,} | {c['mc_rollouts']:,} | {expert} | {per_iter} "
            f"| {_ratio(c['own_wall_s'], eto['own_wall_s'])} | {_ratio(whole, eto_whole)} | {_ratio(c['generated_tokens'], eto['generated_tokens'])} |"
        )  # fmt: skip
    naive = res.get("ipr-naive")
    for name in ("ipr-skip", "ipr") if naive else ():
        if name in res:
            share = ", ".join(f"iteration {k}: {_share(b['rollouts'], a['rollouts'])}" for k, (a, b) in enumerate(zip(naive["agent_mc"], res[name]["agent_mc"]), 1))
            lines.append(f"\nShare of the naive agent MC rollouts that {name} ran: {share}; all MC: {_share(res[name]['mc_rollouts'], naive['mc_rollouts'])}.")
    if naive:
        same = ", ".join(
            f"iteration {k}: {_share(a['same_step_as_expert'], a['estimates'])} exactly, {_share(a['same_action_as_expert'], a['estimates'])} by action"
            for k, a in enumerate(naive["agent_mc"], 1)
        )  # fmt: skip
        lines.append(f"Scored agent steps equal to the expert's step at the same prefix (ipr-naive): {same}.")
    if "ipr" in res:
        bound = ", ".join(f"iteration {k}: {a['skipped_by_expert_reward']} of {a['skipped_targets']}" for k, a in enumerate(res["ipr"]["agent_mc"], 1))
        lines.append(f"Agent targets ipr skipped because their expert's step reward left no margin to win (of all it skipped): {bound}.")
    m = res.get("ipr-action-memo", {}).get("moved")
    if m:
        lines.append(
            f"mc.memo_ignores_thoughts (iteration 1 vs exact): {m['changed']}/{m['estimates']} step rewards changed (mean absolute change {m['mae']}); "
            f"pairs {m['pairs_exact']} exact, {m['pairs_approx']} approximate, {m['pairs_different']} not in both."
        )  # fmt: skip
    return "\n".join(lines)


def _share(a: int, b: int) -> str:
    return f"{a / b:.0%}" if b else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--root", help="artifact root (default: a temporary folder)")
    ap.add_argument("--no-run", action="store_true", help="report on the runs --root already holds (their manifests), computing nothing")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="which runs (default: all; eto is the baseline and always runs)")
    args = ap.parse_args()
    names = ["eto", *(v for v in args.variants if v != "eto")]
    with tempfile.TemporaryDirectory(prefix="ipr-cost-") as tmp:
        res = measure(args.config, args.overrides, args.root or tmp, names, compute=not args.no_run)
    print(report(res))


if __name__ == "__main__":
    main()
