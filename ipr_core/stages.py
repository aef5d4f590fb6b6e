"""Pipeline stages as plain functions over URIs: read inputs, run ipr_core, write
Parquet/safetensors with a manifest through the store, return the output URI.

Prefect tasks (``tasks/``) wrap these one-to-one, adding caching and retries;
``bench/orchestration.py`` calls them directly to measure Prefect's overhead.
Each function is deterministic for a config: rerunning it rewrites the same
artifact (same content digest).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

from ipr_core import ipr, store
from ipr_core.config import IPRConfig
from ipr_core.envs.base import make_env
from ipr_core.policies.base import SamplingParams
from ipr_core.schemas import from_rows
from ipr_core.types import Task, Trajectory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPaths:
    """The artifact layout of one run (DESIGN.md)."""

    run: str  # {root}/{run_name}

    @classmethod
    def of(cls, cfg: IPRConfig) -> "RunPaths":
        return cls(store.join(store.normalize_uri(cfg.storage.root), cfg.run_name))

    def p(self, *parts: str) -> str:
        return store.join(self.run, *parts)

    def experts(self, split: str = "train") -> str:
        return self.p("experts", split)

    def eval_tasks(self) -> str:
        return self.p("tasks", "eval")

    def base_model(self) -> str:
        return self.p("base", "model")

    def sft_model(self) -> str:
        return self.p("sft", "model")

    def expert_mc(self, shard: int) -> str:
        return self.p("scorer", "expert_mc", f"shard-{shard:03d}")

    def expert_rewards(self) -> str:
        return self.p("scorer", "expert_rewards")

    def it(self, k: int, *parts: str) -> str:
        return self.p(f"iter-{k:02d}", *parts)

    def explore(self, k: int, shard: int) -> str:
        return self.it(k, "explore", f"shard-{shard:03d}")

    def agent_mc(self, k: int, shard: int) -> str:
        return self.it(k, "agent_mc", f"shard-{shard:03d}")

    def agent_rewards(self, k: int) -> str:
        return self.it(k, "agent_rewards")

    def pairs(self, k: int) -> str:
        return self.it(k, "pairs")

    def model(self, k: int) -> str:
        return self.it(k, "model")

    def eval(self, tag: str) -> str:
        return self.p("eval", tag)

    def report(self, *parts: str) -> str:
        return self.p("report", *parts)


# --- helpers ---------------------------------------------------------------------------


def _env_factory(cfg: IPRConfig):
    return partial(make_env, cfg.env.name, cfg.env.options, cfg.env.max_steps)


def _policy(cfg: IPRConfig, model_uri: str):
    from ipr_core.policies.factory import make_policy

    return make_policy(cfg.model, cfg.sampling, str(store.read_checkpoint(model_uri)) if cfg.model.backend == "transformers" else model_uri)


def _greedy(cfg: IPRConfig) -> SamplingParams:
    return SamplingParams(temperature=cfg.sampling.explore_temperature, top_p=cfg.sampling.top_p, max_new_tokens=cfg.sampling.max_new_tokens)


def _mc_sampling(cfg: IPRConfig) -> SamplingParams:
    return SamplingParams(temperature=cfg.mc.temperature, top_p=cfg.sampling.top_p, max_new_tokens=cfg.sampling.max_new_tokens)


def read_trajectories(uri: str, kind: str = "trajectories") -> list[Trajectory]:
    return [Trajectory.from_row(r) for r in store.read_rows(uri, kind)]


def ipr_experts(cfg: IPRConfig, experts: Sequence[Trajectory]) -> list[Trajectory]:
    """The expert trajectories IPR explores along: the first train_tasks successful ones."""
    return [e for e in experts if e.error is None and e.success][: cfg.env.train_tasks]


def n_shards(cfg: IPRConfig, n_items: int) -> int:
    return max(1, -(-n_items // cfg.mc.shard_size))


def shard_of(items: Sequence, shard: int, size: int) -> list:
    return list(items[shard * size : (shard + 1) * size])


def _run(cfg: IPRConfig, policy, specs, sampling: SamplingParams, progress: str) -> list[Trajectory]:
    return ipr.run_specs(
        _env_factory(cfg), policy, specs, sampling, history=cfg.sampling.history_turns, workers=cfg.env.workers, batch_size=cfg.sampling.batch_size, concurrency=cfg.env.concurrency, progress=progress
    )


def _close(policy) -> None:
    close = getattr(policy, "close", None)
    if close:
        close()


# --- stages ----------------------------------------------------------------------------


def collect_experts(cfg: IPRConfig, out: str) -> str:
    """Expert trajectories for SFT (train_tasks x multiplier) and IPR (the first train_tasks)."""
    from ipr_core.experts import collect_experts as collect

    t0 = time.time()
    env = _env_factory(cfg)()
    try:
        n = cfg.env.train_tasks * cfg.training.sft.expert_episodes_multiplier
        tasks = env.list_tasks("train", n=n, seed=cfg.seed)
        trajs = collect(env, tasks, run_seed=cfg.seed)
    finally:
        env.close()
    ok = sum(t.success for t in trajs)
    log.info("experts: %d/%d succeeded", ok, len(trajs))
    store.write_dataset(out, from_rows([t.to_row() for t in trajs], "trajectories"), "trajectories", config_digest=cfg.digest(), timings={"wall_s": time.time() - t0}, meta={"successes": ok})
    return out


def eval_task_list(cfg: IPRConfig, out: str) -> str:
    env = _env_factory(cfg)()
    try:
        tasks = env.list_tasks(cfg.env.eval_split, n=cfg.env.eval_tasks, seed=cfg.seed)
    finally:
        env.close()
    store.write_dataset(out, from_rows([t.to_row() for t in tasks], "tasks"), "tasks", config_digest=cfg.digest())
    return out


def build_base_model(cfg: IPRConfig, experts_uri: str, out: str) -> str:
    """The untrained base model: a tiny local model whose tokenizer is trained on
    the environment's text, or a user checkpoint (local path) copied into the store."""
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.model.base == "tiny":
            from ipr_core.conversation import trajectory_messages
            from ipr_core.policies.tiny import build_tiny_model

            trajs = read_trajectories(experts_uri)[: cfg.model.tiny.tokenizer_corpus_episodes]
            corpus = [m["content"] for t in trajs for m in trajectory_messages(t.system, t.instruction, t.steps, include_last_observation=True)]
            src = build_tiny_model(cfg.model.tiny, corpus, Path(tmp) / "model", seed=cfg.seed)
        else:
            src = Path(cfg.model.base)
            if not src.is_dir():
                raise ValueError(f"model.base={cfg.model.base!r} is neither 'tiny' nor a local checkpoint folder")
        store.write_checkpoint(out, src, inputs=[experts_uri], config_digest=cfg.digest(), timings={"wall_s": time.time() - t0})
    return out


def _save_trained(out: str, tmpdir: Path, result, inputs: Sequence[str], cfg: IPRConfig) -> str:
    meta = {k: v for k, v in result.summary().items()} if hasattr(result, "summary") else {}
    store.write_checkpoint(out, tmpdir, inputs=inputs, config_digest=cfg.digest(), meta=meta, timings={"wall_s": getattr(result, "wall_s", 0.0)})
    return out


def sft(cfg: IPRConfig, base_uri: str, experts_uri: str, out: str) -> str:
    """Stage 0 (Eq. 1-2): NLL on the expert trajectories' assistant turns."""
    from ipr_core.training.sft import train_sft

    experts = [e for e in read_trajectories(experts_uri) if e.error is None and e.success]
    with tempfile.TemporaryDirectory() as tmp:
        result = train_sft(str(store.read_checkpoint(base_uri)), experts, cfg.training.sft, cfg.sampling.history_turns, Path(tmp), seed=cfg.seed, precision=cfg.training.precision, progress="sft")
        return _save_trained(out, Path(tmp), result, [base_uri, experts_uri], cfg)


def evaluate(cfg: IPRConfig, model_uri: str, tasks_uri: str, tag: str, iteration: int, out: str) -> str:
    """Greedy episodes on held-out tasks: one row per task."""
    t0 = time.time()
    tasks = [Task.from_row(r) for r in store.read_rows(tasks_uri, "tasks")]
    policy = _policy(cfg, model_uri)
    try:
        eps = _run(cfg, policy, ipr.eval_specs(tasks, cfg.seed, tag), _greedy(cfg), f"eval {tag}")
    finally:
        _close(policy)
    rows = ipr.eval_rows(eps, tag, iteration)
    summary = ipr.summarize_eval(rows)
    store.write_dataset(out, from_rows(rows, "eval"), "eval", inputs=[model_uri, tasks_uri], config_digest=cfg.digest(), timings={"wall_s": time.time() - t0}, meta=summary)
    return out


def expert_mc_shard(cfg: IPRConfig, scorer_uri: str, experts_uri: str, shard: int, out: str) -> str:
    """Stage 1 for the expert: N scorer rollouts after every expert step (one shard)."""
    experts = shard_of(ipr_experts(cfg, read_trajectories(experts_uri)), shard, cfg.mc.shard_size)
    return _mc(cfg, scorer_uri, ipr.expert_targets(experts), [scorer_uri, experts_uri], out, f"expert MC shard {shard}")


def agent_mc_shard(cfg: IPRConfig, scorer_uri: str, branches_uri: str, out: str) -> str:
    """Stage 1 for the agent: N scorer rollouts after each branch's first own action."""
    branches = read_trajectories(branches_uri, "branches")
    return _mc(cfg, scorer_uri, ipr.branch_targets([(b.traj_id, b) for b in branches]), [scorer_uri, branches_uri], out, f"agent MC {Path(branches_uri).name}")


def _mc(cfg: IPRConfig, scorer_uri: str, targets, inputs, out: str, label: str) -> str:
    t0 = time.time()
    specs = ipr.mc_specs(targets, cfg.mc.n_rollouts, cfg.seed)
    policy = _policy(cfg, scorer_uri) if specs else None
    try:
        rollouts = _run(cfg, policy, specs, _mc_sampling(cfg), label) if specs else []
    finally:
        _close(policy)
    rows = ipr.mc_rollout_rows(rollouts)
    store.write_dataset(out, from_rows(rows, "mc_rollouts"), "mc_rollouts", inputs=inputs, config_digest=cfg.digest(), timings={"wall_s": time.time() - t0}, meta={"targets": len(targets), "rollouts": len(rows)})
    return out


def expert_step_rewards(cfg: IPRConfig, experts_uri: str, mc_uris: Sequence[str], out: str) -> str:
    """Eq. 3-5 over every expert step (computed once per scorer, reused by every iteration)."""
    targets = ipr.expert_targets(ipr_experts(cfg, read_trajectories(experts_uri)))
    return _rewards(cfg, targets, [experts_uri, *mc_uris], mc_uris, out)


def agent_step_rewards(cfg: IPRConfig, branch_uris: Sequence[str], mc_uris: Sequence[str], out: str) -> str:
    branches = [b for u in branch_uris for b in read_trajectories(u, "branches")]
    targets = ipr.branch_targets([(b.traj_id, b) for b in branches])
    return _rewards(cfg, targets, [*branch_uris, *mc_uris], mc_uris, out)


def _rewards(cfg: IPRConfig, targets, inputs, mc_uris, out: str) -> str:
    rollouts = [r for u in mc_uris for r in store.read_rows(u, "mc_rollouts")]
    rows = ipr.step_rewards(targets, rollouts)
    store.write_dataset(out, from_rows(rows, "step_rewards"), "step_rewards", inputs=inputs, config_digest=cfg.digest(), meta=ipr.reward_stats(rows))
    return out


def explore_shard(cfg: IPRConfig, policy_uri: str, experts_uri: str, iteration: int, shard: int, out: str) -> str:
    """Stage 2: the current policy continues greedily from every expert prefix e_{1:j}."""
    t0 = time.time()
    experts = shard_of(ipr_experts(cfg, read_trajectories(experts_uri)), shard, cfg.mc.shard_size)
    specs = ipr.explore_specs(experts, iteration, cfg.seed)
    policy = _policy(cfg, policy_uri)
    try:
        branches = _run(cfg, policy, specs, _greedy(cfg), f"explore it{iteration} shard {shard}")
    finally:
        _close(policy)
    rows = ipr.branch_rows(branches, iteration)
    store.write_dataset(out, from_rows(rows, "branches"), "branches", inputs=[policy_uri, experts_uri], config_digest=cfg.digest(), timings={"wall_s": time.time() - t0}, meta={"branches": len(rows)})
    return out


def build_pairs(cfg: IPRConfig, experts_uri: str, branch_uris: Sequence[str], expert_rewards_uri: str, agent_rewards_uri: str, iteration: int, out: str) -> str:
    """Stage 3 (Eq. 6-9): outcome pairs (j = 0) and step pairs (j >= 1)."""
    experts = ipr_experts(cfg, read_trajectories(experts_uri))
    branches = [b for u in branch_uris for b in read_trajectories(u, "branches")]
    rewards = store.read_rows(expert_rewards_uri, "step_rewards") + store.read_rows(agent_rewards_uri, "step_rewards")
    p = cfg.pairs
    rows = ipr.build_pairs(experts, branches, rewards, ipr.PairRules(p.tau_step, p.tau_outcome, p.step_variant, p.outcome_pairs, p.step_pairs), iteration)
    counts = {"outcome": sum(r["kind"] == "outcome" for r in rows), "step": sum(r["kind"] == "step" for r in rows)}
    log.info("iteration %d pairs: %s", iteration, counts)
    store.write_dataset(out, from_rows(rows, "pairs"), "pairs", inputs=[experts_uri, *branch_uris, expert_rewards_uri, agent_rewards_uri], config_digest=cfg.digest(), meta=counts)
    return out


def train_iteration(cfg: IPRConfig, policy_uri: str, reference_uri: str, pairs_uri: str, experts_uri: str, iteration: int, out: str) -> str:
    """Stage 4 (Eq. 10): outcome-DPO + step-DPO + SFT, starting from the previous policy."""
    from ipr_core.training.ipr_trainer import train_ipr

    pairs = store.read_rows(pairs_uri, "pairs")
    experts = [e for e in read_trajectories(experts_uri) if e.error is None and e.success]
    with tempfile.TemporaryDirectory() as tmp:
        result = train_ipr(
            str(store.read_checkpoint(policy_uri)),
            str(store.read_checkpoint(reference_uri)),
            pairs,
            experts,
            cfg.training.ipr,
            cfg.sampling.history_turns,
            Path(tmp),
            seed=cfg.seed + iteration,
            precision=cfg.training.precision,
            progress=f"train it{iteration}",
        )
        return _save_trained(out, Path(tmp), result, [policy_uri, reference_uri, pairs_uri, experts_uri], cfg)
