"""The IPR pipeline as Prefect flows.

``ipr_pipeline`` (parent): experts -> base model -> SFT -> expert MC (once,
sharded) -> for k in 1..K the ``ipr_iteration`` subflow (explore -> agent MC ->
pairs -> train -> evaluate) -> best iteration by held-out reward -> report.

Every stage is a cached task whose output is a URI (tasks/common.py): rerunning
a failed or finished run with the same config recomputes only what is missing.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from ipr_core import report as rep
from ipr_core import store
from ipr_core.config import IPRConfig, config_from_json
from ipr_core.stages import RunPaths, ipr_experts, n_shards, read_trajectories
from tasks import stages as T
from tasks.common import configure, result_storage, stage_cfg

log = logging.getLogger("ipr_flow")

# Config sections each stage depends on (its cache key sees only these).
SECTIONS = {
    "experts": ("env", "training.sft.expert_episodes_multiplier"),
    "eval_tasks": ("env",),
    "base": ("model",),
    "sft": ("training.sft", "training.precision", "sampling.history_turns"),
    "evaluate": ("env", "sampling", "model"),
    "mc": ("env", "sampling", "model", "mc"),
    "rewards": ("env", "mc"),
    "explore": ("env", "sampling", "model", "mc"),
    "pairs": ("env", "mc", "pairs"),
    "train": ("training.ipr", "training.precision", "sampling.history_turns"),
}


def artifact_key(*parts: str) -> str:
    """Stable lowercase-dash keys so artifacts version across runs in the UI."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


class _Stages:
    """Submits stage tasks configured for this run (retries, result storage),
    refreshing the cache of any stage whose artifact is missing or incomplete."""

    def __init__(self, cfg: IPRConfig):
        self.cfg = cfg
        self.storage = result_storage(cfg)
        self.executed: list[str] = []

    def submit(self, task, section: str, out: str, wait_for: Any = None, **params) -> PrefectFuture:
        refresh = not store.exists(out)
        if refresh:
            self.executed.append(out)
        t = configure(task, self.cfg, self.storage).with_options(refresh_cache=refresh)
        return t.submit(cfg=stage_cfg(self.cfg, *SECTIONS[section]), out=out, wait_for=wait_for, **params)

    def run(self, task, section: str, out: str, **params) -> str:
        return self.submit(task, section, out, **params).result()


def _config_run_name(params: dict) -> str:
    cfg = params.get("config") or {}
    return cfg.get("run_name", "ipr") if isinstance(cfg, dict) else getattr(cfg, "run_name", "ipr")


def _run_name() -> str:
    return f"{_config_run_name(flow_run.parameters or {})}-{time.strftime('%Y%m%d-%H%M%S')}"


def _iteration_run_name() -> str:
    params = flow_run.parameters or {}
    return f"{_config_run_name(params)}-iter-{int(params.get('iteration', 0)):02d}"


@flow(name="ipr-iteration", flow_run_name=_iteration_run_name, log_prints=True)
def ipr_iteration(config: dict, iteration: int, policy_uri: str, scorer_uri: str, reference_uri: str, experts_uri: str, expert_rewards_uri: str, eval_tasks_uri: str) -> dict:
    """One IPR iteration: explore -> agent MC -> pairs -> train -> evaluate."""
    cfg = config_from_json(config)
    paths, st, k = RunPaths.of(cfg), _Stages(cfg), iteration
    logger = get_run_logger()
    t0 = time.time()
    n = n_shards(cfg, len(ipr_experts(cfg, read_trajectories(experts_uri))))
    # Stage 2 and Stage 1 on the agent, sharded: a resumed run redoes only missing shards.
    explore = [st.submit(T.explore, "explore", paths.explore(k, s), policy_uri=policy_uri, experts_uri=experts_uri, iteration=k, shard=s) for s in range(n)]
    mc = [st.submit(T.agent_mc, "mc", paths.agent_mc(k, s), scorer_uri=scorer_uri, branches_uri=f) for s, f in enumerate(explore)]
    branch_uris = [f.result() for f in explore]
    mc_uris = [f.result() for f in mc]
    t_explore = time.time()
    agent_rewards = st.run(T.agent_rewards, "rewards", paths.agent_rewards(k), branch_uris=branch_uris, mc_uris=mc_uris)
    pairs = st.run(T.pairs, "pairs", paths.pairs(k), experts_uri=experts_uri, branch_uris=branch_uris, expert_rewards_uri=expert_rewards_uri, agent_rewards_uri=agent_rewards, iteration=k)
    t_pairs = time.time()
    model = st.run(T.train, "train", paths.model(k), policy_uri=policy_uri, reference_uri=reference_uri, pairs_uri=pairs, experts_uri=experts_uri, iteration=k)
    t_train = time.time()
    ev = st.run(T.evaluate, "evaluate", paths.eval(f"iter-{k:02d}"), model_uri=model, tasks_uri=eval_tasks_uri, tag=f"iter-{k:02d}", iteration=k)
    pm, tm, em, rm = (store.read_manifest(u) for u in (pairs, model, ev, agent_rewards))
    row = {
        "model": f"iter-{k:02d}",
        **{k2: em.meta.get(k2) for k2 in ("success_rate", "mean_reward")},
        "outcome_pairs": pm.meta.get("outcome", 0),
        "step_pairs": pm.meta.get("step", 0),
        "train_loss": tm.meta.get("final_loss"),
        "agent_step_reward_mean": rm.meta.get("mean"),
        "explore_mc_s": round(t_explore - t0, 1),
        "pairs_s": round(t_pairs - t_explore, 1),
        "train_s": round(t_train - t_pairs, 1),
        "eval_s": round(time.time() - t_train, 1),
        "recomputed_stages": len(st.executed),
    }
    create_table_artifact([row], key=artifact_key(cfg.run_name, f"iter-{k:02d}"), description=f"IPR iteration {k}: held-out results, pair counts, losses, stage times")
    create_link_artifact(model, link_text=f"iteration {k} checkpoint", key=artifact_key(cfg.run_name, f"iter-{k:02d}-model"))
    logger.info("iteration %d: %s", k, json.dumps(row))
    return {"model_uri": model, "eval_uri": ev, "pairs_uri": pairs, "agent_rewards_uri": agent_rewards, "row": row, "executed": st.executed}


@flow(name="ipr-pipeline", flow_run_name=_run_name, log_prints=True)
def ipr_pipeline(config: IPRConfig) -> dict:
    """IPR end to end: SFT, expert MC once, K iterations, the best model and a report."""
    cfg = config_from_json(config)
    cfg_json = cfg.model_dump(mode="json")
    paths, st = RunPaths.of(cfg), _Stages(cfg)
    logger = get_run_logger()
    total = 5 + cfg.pipeline.iterations
    progress = create_progress_artifact(0.0, key=artifact_key(cfg.run_name, "progress"), description=f"IPR run {cfg.run_name}")
    done = 0

    def tick(what: str) -> None:
        nonlocal done
        done += 1
        update_progress_artifact(progress, 100.0 * done / total, description=f"{cfg.run_name}: {what}")
        logger.info("progress %d/%d: %s", done, total, what)

    store.write_bytes(store.join(paths.run, "config.json"), json.dumps(cfg_json, indent=2).encode())
    experts_f = st.submit(T.collect_experts, "experts", paths.experts("train"))
    tasks_f = st.submit(T.eval_tasks, "eval_tasks", paths.eval_tasks())
    experts = experts_f.result()
    base = st.run(T.base_model, "base", paths.base_model(), experts_uri=experts)
    eval_tasks_uri = tasks_f.result()
    tick("experts and base model")
    base_eval = st.submit(T.evaluate, "evaluate", paths.eval("base"), model_uri=base, tasks_uri=eval_tasks_uri, tag="base", iteration=-1) if cfg.pipeline.eval_base else None
    sft = st.run(T.sft, "sft", paths.sft_model(), base_uri=base, experts_uri=experts)
    tick("SFT")
    sft_eval = st.submit(T.evaluate, "evaluate", paths.eval("sft"), model_uri=sft, tasks_uri=eval_tasks_uri, tag="sft", iteration=0)
    # Stage 1 on the expert, once: the scorer (the SFT model) is fixed.
    n = n_shards(cfg, len(ipr_experts(cfg, read_trajectories(experts))))
    mc = [st.submit(T.expert_mc, "mc", paths.expert_mc(s), scorer_uri=sft, experts_uri=experts, shard=s) for s in range(n)]
    expert_rewards = st.run(T.expert_rewards, "rewards", paths.expert_rewards(), experts_uri=experts, mc_uris=[f.result() for f in mc])
    tick("expert MC step rewards")
    rows = []
    if base_eval is not None:
        rows.append({"model": "base", **_eval_meta(base_eval.result())})
    rows.append({"model": "sft", **_eval_meta(sft_eval.result())})
    tick("base and SFT evaluation")
    create_link_artifact(sft, link_text="SFT checkpoint (scorer)", key=artifact_key(cfg.run_name, "sft-model"))

    policy, best, best_reward = sft, ("sft", sft), rows[-1]["mean_reward"]
    executed = list(st.executed)
    agent_rewards: dict[int, str] = {}
    for k in range(1, cfg.pipeline.iterations + 1):
        reference = sft if cfg.training.ipr.reference == "sft" else policy
        # the subflow maps its shards on the same kind of runner as the parent
        out = ipr_iteration.with_options(task_runner=task_runner(cfg))(cfg_json, k, policy, sft, reference, experts, expert_rewards, eval_tasks_uri)
        executed += out["executed"]
        rows.append(out["row"])
        agent_rewards[k] = out["agent_rewards_uri"]
        policy = out["model_uri"]
        tick(f"iteration {k}")
        reward = out["row"]["mean_reward"]
        if reward > best_reward:
            best, best_reward = (f"iter-{k:02d}", policy), reward
        elif cfg.pipeline.early_stop and reward < best_reward:
            logger.info("held-out reward fell (%.3f < best %.3f): stopping early", reward, best_reward)
            break

    table = rep.iteration_table(rows)
    links = {"best model": best[1], "SFT model": sft, "expert step rewards": expert_rewards}
    md, md_uri = rep.write_report(
        paths.report(), cfg.run_name, rows, [r["reward"] for r in store.read_rows(expert_rewards, "step_rewards")],
        {k: [r["reward"] for r in store.read_rows(u, "step_rewards")] for k, u in agent_rewards.items()}, best[0], links,
    )
    create_markdown_artifact(md, key=artifact_key(cfg.run_name, "report"), description=f"IPR run report ({md_uri})")
    create_table_artifact(rows, key=artifact_key(cfg.run_name, "summary"), description="Held-out results per model")
    create_link_artifact(best[1], link_text=f"best model ({best[0]})", key=artifact_key(cfg.run_name, "best-model"))
    tick("report")
    logger.info("per-iteration results:\n%s", table)
    return {"run": paths.run, "rows": rows, "best": best[0], "best_model": best[1], "table": table, "report": md_uri, "executed": executed}


def _eval_meta(uri: str) -> dict:
    m = store.read_manifest(uri)
    return {"success_rate": m.meta.get("success_rate"), "mean_reward": m.meta.get("mean_reward")}


def task_runner(cfg: IPRConfig):
    """The task runner from config: threads (default), Dask or Ray."""
    if cfg.pipeline.task_runner == "threads":
        # Not Prefect's plain ThreadPoolTaskRunner: its idle worker threads keep
        # torch's OpenMP teams alive, which made every stage 1.5-1.9x slower on
        # 2 cores (flows/task_runners.py).
        from flows.task_runners import StageTaskRunner

        return StageTaskRunner(max_workers=cfg.pipeline.max_workers)
    if cfg.pipeline.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise ImportError("pipeline.task_runner=dask needs prefect-dask: pip install 'ipr-flow[dask]'") from e
        if cfg.pipeline.dask_address:
            return DaskTaskRunner(address=cfg.pipeline.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.pipeline.max_workers, "threads_per_worker": 1, "processes": True})
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as e:
        raise ImportError("pipeline.task_runner=ray needs prefect-ray: pip install 'ipr-flow[ray]'") from e
    return RayTaskRunner()


def run_pipeline(cfg: IPRConfig) -> dict:
    """Run the parent flow with the task runner the config asks for."""
    runner = task_runner(cfg)
    return ipr_pipeline.with_options(task_runner=runner)(cfg)
