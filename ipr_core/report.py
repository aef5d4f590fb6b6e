"""Run summaries: the per-iteration table, plots and the markdown report."""

from __future__ import annotations

import base64
import io
import json
from typing import Mapping, Sequence

from ipr_core import store


def eval_summary(uri: str) -> dict | None:
    m = store.read_manifest(uri)
    return dict(m.meta) if m is not None else None


def rounded(row: Mapping, digits: int = 4) -> dict:
    """A copy of ``row`` with floats rounded for reading (artifacts keep full precision)."""
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in row.items()}


def _cell(row: Mapping, key: str, fmt: str, width: int = 0) -> str:
    """A number formatted with ``fmt``, or "-" (right-aligned to ``width``) when absent."""
    v = row.get(key)
    return format(v, fmt) if isinstance(v, (int, float)) else "-".rjust(width)


def iteration_table(rows: Sequence[Mapping]) -> str:
    """A plain-text table: model, held-out success rate and mean reward, pairs, losses."""
    head = f"{'model':<10} {'success':>8} {'reward':>8} {'outcome pairs':>14} {'step pairs':>11} {'train loss':>11} {'steps':>11}"
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(key, fmt):
            return _cell(r, key, fmt, int(fmt.rstrip("fd").split(".")[0]))

        lines.append(f"{r['model']:<10} {f('success_rate', '8.3f')} {f('mean_reward', '8.3f')} {f('outcome_pairs', '14d')} {f('step_pairs', '11d')} {f('train_loss', '11.4f')} {r.get('train_steps') or '-':>11}")
    notes = [f"note: {r['model']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(lines + notes)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def plots(rows: Sequence[Mapping], expert_rewards: Sequence[float], agent_rewards: Mapping[int, Sequence[float]]) -> dict[str, bytes]:
    """PNG plots: held-out reward per iteration; step-reward distributions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    fig, ax = plt.subplots(figsize=(5, 3))
    names = [r["model"] for r in rows]
    ax.plot(names, [r.get("mean_reward", 0.0) for r in rows], marker="o", label="mean reward")
    ax.plot(names, [r.get("success_rate", 0.0) for r in rows], marker="s", label="success rate")
    ax.set_ylim(0, 1)
    ax.set_title("Held-out evaluation")
    ax.legend()
    out["reward_per_iteration.png"] = _png(fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    bins = [i / 20 for i in range(21)]
    if expert_rewards:
        ax.hist(expert_rewards, bins=bins, alpha=0.6, label="expert steps")
    for k, vals in sorted(agent_rewards.items()):
        if vals:
            ax.hist(vals, bins=bins, alpha=0.5, label=f"agent steps it{k}")
    ax.set_xlabel("MC step reward")
    ax.set_title("Step-reward distributions")
    ax.legend()
    out["step_rewards.png"] = _png(fig)
    plt.close(fig)
    return out


def markdown(run_name: str, rows: Sequence[Mapping], images: Mapping[str, str], best: str, links: Mapping[str, str]) -> str:
    """The run report; images are data: URIs so the UI page is self-contained."""
    lines = [f"# IPR run `{run_name}`", "", f"Best model on held-out tasks: **{best}**", "", "| model | success | mean reward | outcome pairs | step pairs | train loss | train steps | note |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(key, fmt):
            return _cell(r, key, fmt)

        lines.append(f"| {r['model']} | {f('success_rate', '.3f')} | {f('mean_reward', '.3f')} | {f('outcome_pairs', 'd')} | {f('step_pairs', 'd')} | {f('train_loss', '.4f')} | {r.get('train_steps') or '-'} | {r.get('note') or ''} |")
    lines.append("")
    for name, uri in images.items():
        lines += [f"![{name}]({uri})", ""]
    if links:
        lines += ["## Artifacts", ""] + [f"- {k}: `{v}`" for k, v in links.items()]
    return "\n".join(lines)


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def write_report(report_uri: str, run_name: str, rows: Sequence[Mapping], expert_rewards, agent_rewards, best: str, links: Mapping[str, str]) -> tuple[str, str]:
    """Write PNGs, report.md and summary.json under ``report_uri``; returns (markdown, md uri)."""
    pngs = plots(rows, expert_rewards, agent_rewards)
    for name, data in pngs.items():
        store.write_bytes(store.join(report_uri, name), data)
    md = markdown(run_name, rows, {n: data_uri(d) for n, d in pngs.items()}, best, links)
    md_uri = store.join(report_uri, "report.md")
    store.write_bytes(md_uri, md.encode())
    store.write_bytes(store.join(report_uri, "summary.json"), json.dumps({"run": run_name, "best": best, "rows": list(rows), "links": dict(links)}, indent=2).encode())
    return md, md_uri
