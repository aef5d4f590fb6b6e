"""The IPR pipeline as Prefect flows, submitting the DAG of ipr_core.pipeline.dag.

``ipr_pipeline`` (parent): experts -> base model -> SFT -> expert MC (once,
sharded) -> for k in 1..K the ``ipr_iteration`` subflow (explore -> agent MC ->
pairs -> train -> evaluate) -> best iteration by held-out reward -> report.

Every stage is a task derived from its declaration (tasks/stages.py) whose
output is a URI: rerunning a failed or finished run with the same config
recomputes only what is missing or whose identity changed.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Sequence

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Completed

from ipr_core import report as rep
from ipr_core import store
from ipr_core.config import IPRConfig, config_from_json
from ipr_core.progress import logs_above_bars
from ipr_core.lease import Lease
from ipr_core.pipeline import check, client_options, dag, run_uri, save_config
from ipr_core.pipeline import summary
from ipr_core.pipeline.summary import model_row, result_rows
from flows.clusters import Placement, task_runner
from tasks.common import configure, result_storage
from tasks.stages import TASKS

log = logging.getLogger("ipr_flow")


def artifact_key(*parts: str) -> str:
    """Stable lowercase-dash keys so artifacts version across runs in the UI."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


class Stages:
    """Submits DAG nodes as tasks configured for this run (retries, result
    storage), refreshing the cache of any stage whose artifact is missing."""

    def __init__(self, cfg: IPRConfig, uris: dict[str, Any] | None = None):
        self.cfg, self.cfg_json, self.run = cfg, cfg.model_dump(mode="json"), run_uri(cfg)
        self.storage = result_storage(cfg)
        self.futures: dict[str, Any] = dict(uris or {})  # node key -> future or URI
        self.t0 = time.time()
        # what each stage asks a Ray or Dask cluster for, checked against it before the first submission
        ctx = FlowRunContext.get()
        self.placement = Placement.of(cfg, ctx.task_runner if ctx else None)

    def submit(self, node: dag.Node) -> PrefectFuture:
        call = node.call(self.run, self.futures)
        # a missing or damaged artifact behind a cache record is never trusted
        t = configure(TASKS[node.stage], self.cfg, self.storage).with_options(refresh_cache=not store.intact(call.out))
        with self.placement.place(call.stage.needs):
            fut = t.submit(cfg=self.cfg_json, out=call.out, inputs=call.inputs, params=call.params)
        self.futures[node.key] = fut
        return fut

    def submit_all(self, nodes: Sequence[dag.Node]) -> None:
        for n in nodes:
            if n.key not in self.futures:
                self.submit(n)

    def uri(self, node: dag.Node) -> str:
        v = self.futures[node.key]
        return v.result() if isinstance(v, PrefectFuture) else v

    def computed(self, nodes: Sequence[dag.Node]) -> list[str]:
        """Keys of the nodes whose artifact this flow run computed (not reused or copied)."""
        ms = {n.key: store.read_manifest(store.join(self.run, n.key)) for n in nodes}
        return [k for k, m in ms.items() if m is not None and m.origin == "computed" and m.created_at >= self.t0]


def _config_run_name(params: dict) -> str:
    cfg = params.get("config") or {}
    return cfg.get("run_name", "ipr") if isinstance(cfg, dict) else getattr(cfg, "run_name", "ipr")


def _run_name() -> str:
    return f"{_config_run_name(flow_run.parameters or {})}-{time.strftime('%Y%m%d-%H%M%S')}"


def _iteration_run_name() -> str:
    params = flow_run.parameters or {}
    return f"{_config_run_name(params)}-iter-{int(params.get('iteration', 0)):02d}"


@flow(name="ipr-iteration", flow_run_name=_iteration_run_name, log_prints=True)
def ipr_iteration(config: dict, iteration: int, shards: int, policy_key: str, uris: dict[str, str]) -> dict:
    """One IPR iteration: explore -> agent MC -> pairs -> train -> evaluate.

    ``uris``: the prologue's artifacts and the current policy, by node key."""
    cfg, k = config_from_json(config), iteration
    prologue = dag.prologue(cfg, shards)
    policy = next(n for n in dag.plan(cfg, shards) if n.key == policy_key)
    nodes = dag.iteration(cfg, k, shards, prologue, policy)
    st = Stages(cfg, uris)
    st.submit_all(nodes)
    model, ev = dag.trained(nodes), next(n for n in nodes if n.stage == "evaluate")  # test first
    model_uri = st.uri(model)
    for n in nodes:
        st.uri(n)
    row = model_row(st.run, ev, nodes)
    create_table_artifact([rep.rounded(row)], key=artifact_key(cfg.run_name, f"iter-{k:02d}"), description=f"IPR iteration {k}: held-out results, pair counts, losses, stage times")
    model_artifact(cfg, model_uri, f"iteration {k} checkpoint", artifact_key(cfg.run_name, f"iter-{k:02d}-model"))
    get_run_logger().info("iteration %d: %s", k, json.dumps(row))
    return {"model_key": model.key, "model_uri": model_uri, "row": row, "computed": st.computed(nodes)}


def _progress(cfg: IPRConfig):
    logger = get_run_logger()
    total, done = 2 + cfg.pipeline.iterations, [0]
    progress = create_progress_artifact(0.0, key=artifact_key(cfg.run_name, "progress"), description=f"IPR run {cfg.run_name}")

    def tick(what: str) -> None:
        done[0] += 1
        update_progress_artifact(progress, 100.0 * done[0] / total, description=f"{cfg.run_name}: {what}")
        logger.info("progress %d/%d: %s", done[0], total, what)

    return tick


@flow(name="ipr-pipeline", flow_run_name=_run_name, log_prints=True)
def ipr_pipeline(config: IPRConfig, take_over: bool = False) -> dict:
    """IPR end to end: SFT, expert MC once, K iterations, the best model and a report.

    The run holds a lease on its folder throughout (ipr_core/lease.py): a second
    run on the same folder is refused; ``take_over`` takes a dead holder's lease."""
    cfg = config_from_json(config)
    check(cfg)
    with store.client_options(client_options(cfg)), Lease(run_uri(cfg), take_over):
        return _pipeline(cfg)


def quiet_libraries() -> None:
    """transformers' own "Loading weights" bar at every model load drowns the stages'
    bars and log lines; each stage shows one progress bar of its own instead, and
    log lines (Prefect's console handler included) are written above the bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logs_above_bars()


def _pipeline(cfg: IPRConfig):
    quiet_libraries()
    st, tick = Stages(cfg), _progress(cfg)
    save_config(cfg)
    first = [n for n in dag.prologue(cfg, 1) if n.stage in ("experts", "eval-tasks")]  # the experts decide the shard count
    st.submit_all(first)
    shards = dag.shard_count(cfg, st.uri(first[0]))
    prologue = dag.prologue(cfg, shards)
    st.submit_all(prologue)
    for n in prologue:
        st.uri(n)
    up_front = "expert MC step rewards, " if dag.expert_mc_up_front(cfg) else ""
    tick(f"experts, base model, SFT, {up_front}base and SFT evaluation")
    nodes, computed = list(prologue), st.computed(prologue)
    rows = result_rows(st.run, prologue)
    uris = {n.key: st.uri(n) for n in prologue}
    policy = next(n for n in prologue if n.stage == "sft")
    for k in range(1, cfg.pipeline.iterations + 1):
        # the subflow maps its shards on the same kind of runner as the parent
        out = ipr_iteration.with_options(task_runner=task_runner(cfg))(st.cfg_json, k, shards, policy.key, uris)
        it = dag.iteration(cfg, k, shards, prologue, policy)
        nodes += it
        computed += out["computed"]
        rows.append(out["row"])
        policy = dag.trained(it)
        uris[policy.key] = out["model_uri"]
        tick(f"iteration {k}")
        top, on, _ = summary.best(rows)
        key = summary.SELECTED_BY[on]
        if cfg.pipeline.early_stop and top is not None and rows[-1][key] < top[key]:
            get_run_logger().info("%s reward fell (%.3f < best %.3f): stopping early", on, rows[-1][key], top[key])
            break
    return _publish(cfg, st, nodes, rows, computed, tick)


def browser_url(cfg: IPRConfig, uri: str) -> str | None:
    """A URL a browser can open for ``uri``: from ``storage.link_template`` for object
    stores ({bucket}, {key}), plain http(s) URIs as they are; None otherwise."""
    if uri.startswith(("http://", "https://")):
        return uri
    scheme, _, rest = uri.partition("://")
    if not rest or cfg.storage.link_template is None:
        return None
    bucket, _, key = rest.partition("/")
    return cfg.storage.link_template.format(bucket=bucket, key=key, uri=uri)


def model_artifact(cfg: IPRConfig, uri: str, what: str, key: str) -> None:
    """A link artifact where a browser can open the checkpoint; otherwise a markdown
    artifact with its location and the lines that load it (a local path is a dead link)."""
    url = browser_url(cfg, uri)
    if url is not None:
        create_link_artifact(url, link_text=what, key=key)
        return
    load = f"ipr_flow_dir = ipr_core.store.read_checkpoint({uri!r})  # a local folder (downloaded once per digest)"
    md = "\n".join([
        f"**{what}**", "", f"Location: `{uri}`", "", "```python", "import ipr_core.store", load,
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "model = AutoModelForCausalLM.from_pretrained(ipr_flow_dir)",
        "tokenizer = AutoTokenizer.from_pretrained(ipr_flow_dir)", "```",
    ])  # fmt: skip
    create_markdown_artifact(md, key=key, description=what)


def best_text(best: tuple) -> str:
    """'iter-02 (chosen on the val tasks; note)' for reports and logs."""
    tag, _, on, note = best
    return f"{tag} (chosen on the {on} tasks{'; ' + note if note else ''})"


def _publish(cfg: IPRConfig, st: Stages, nodes, rows, computed, tick) -> dict:
    """The report, the summary table and the links, as artifacts."""
    top, on, note = summary.best(rows)
    tag = top["model"] if top is not None else "sft"
    best = (tag, summary.evaluated_model(st.run, nodes, tag), on, note)
    # the prologue's (scorer/...) or each iteration's (iter-NN/...) expert step rewards
    expert_rewards = {n.key.split("/")[0]: store.join(st.run, n.key) for n in dag.expert_mc_rewards(nodes)}
    pairs = [n for n in nodes if n.stage == "pairs"]
    agent = {n.iteration: store.join(st.run, dict(n.inputs)["agent_rewards_uri"]) for n in pairs}
    links = {"best model": best[1], "SFT model": store.join(st.run, "sft/model")}
    links |= {f"expert step rewards ({where})": u for where, u in expert_rewards.items()}
    notes = summary.run_data_notes(st.run, nodes, cfg.env.name)
    md, md_uri = rep.write_report(
        store.join(st.run, "report"), cfg.run_name, rows, _expert_step_rewards(expert_rewards.values()),
        {k: [r["reward"] for r in store.read_rows(u, "step_rewards")] for k, u in agent.items()}, best_text(best), links, notes,
    )  # fmt: skip
    create_markdown_artifact(md, key=artifact_key(cfg.run_name, "report"), description=f"IPR run report ({md_uri})")
    create_table_artifact([rep.rounded(r) for r in rows], key=artifact_key(cfg.run_name, "summary"), description="Held-out results per model")
    model_artifact(cfg, links["SFT model"], "SFT checkpoint (scorer)", artifact_key(cfg.run_name, "sft-model"))
    model_artifact(cfg, best[1], f"best model ({best_text(best)})", artifact_key(cfg.run_name, "best-model"))
    tick("report")
    table = rep.iteration_table(rows)
    get_run_logger().info("per-iteration results:\n%s", table)
    out = {"run": st.run, "rows": rows, "best": best[0], "best_model": best[1], "chosen_on": on, "best_note": note, "table": table, "report": md_uri, "executed": computed}
    # The run's final state message, what the UI shows beside "Completed": the winner and every flag.
    flags = [f"{r['model']}: {r['note']}" for r in rows if r.get("note")]
    return Completed(message="; ".join([f"best: {best_text(best)}", *flags]), data=out)


def _expert_step_rewards(uris: Sequence[str]) -> list[float]:
    """The MC rewards of every expert step scored (each once, however many iterations compared it)."""
    rows = {(r["branch_id"], r["step"]): r["reward"] for u in uris for r in store.read_rows(u, "step_rewards")}
    return list(rows.values())


def run_pipeline(cfg: IPRConfig, take_over: bool = False) -> dict:
    """Run the parent flow with the task runner the config asks for."""
    runner = task_runner(cfg)
    return ipr_pipeline.with_options(task_runner=runner)(cfg, take_over)
