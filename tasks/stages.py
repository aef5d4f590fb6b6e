"""One Prefect task per IPR stage. Thin: config dict + input URIs in, output URI out."""

from __future__ import annotations

from ipr_core import stages
from tasks.common import as_config, stage_task


@stage_task("collect-experts")
def collect_experts(cfg: dict, out: str) -> str:
    """Expert trajectories from the environment's own expert."""
    return stages.collect_experts(as_config(cfg), out)


@stage_task("eval-tasks")
def eval_tasks(cfg: dict, out: str) -> str:
    """The held-out task list."""
    return stages.eval_task_list(as_config(cfg), out)


@stage_task("base-model")
def base_model(cfg: dict, experts_uri: str, out: str) -> str:
    """The untrained base model (tiny local model or a user checkpoint)."""
    return stages.build_base_model(as_config(cfg), experts_uri, out)


@stage_task("sft")
def sft(cfg: dict, base_uri: str, experts_uri: str, out: str) -> str:
    """Stage 0: supervised fine-tuning on expert trajectories."""
    return stages.sft(as_config(cfg), base_uri, experts_uri, out)


@stage_task("evaluate")
def evaluate(cfg: dict, model_uri: str, tasks_uri: str, tag: str, iteration: int, out: str) -> str:
    """Greedy held-out evaluation."""
    return stages.evaluate(as_config(cfg), model_uri, tasks_uri, tag, iteration, out)


@stage_task("expert-mc")
def expert_mc(cfg: dict, scorer_uri: str, experts_uri: str, shard: int, out: str) -> str:
    """Stage 1 on expert steps, one shard."""
    return stages.expert_mc_shard(as_config(cfg), scorer_uri, experts_uri, shard, out)


@stage_task("expert-rewards")
def expert_rewards(cfg: dict, experts_uri: str, mc_uris: list[str], out: str) -> str:
    """Stage 1: expert step rewards from all shards' rollouts."""
    return stages.expert_step_rewards(as_config(cfg), experts_uri, mc_uris, out)


@stage_task("explore")
def explore(cfg: dict, policy_uri: str, experts_uri: str, iteration: int, shard: int, out: str) -> str:
    """Stage 2: the agent explores from every expert prefix, one shard."""
    return stages.explore_shard(as_config(cfg), policy_uri, experts_uri, iteration, shard, out)


@stage_task("agent-mc")
def agent_mc(cfg: dict, scorer_uri: str, branches_uri: str, out: str) -> str:
    """Stage 1 on the agent's branch actions, one shard."""
    return stages.agent_mc_shard(as_config(cfg), scorer_uri, branches_uri, out)


@stage_task("agent-rewards")
def agent_rewards(cfg: dict, branch_uris: list[str], mc_uris: list[str], out: str) -> str:
    """Stage 1: agent step rewards from all shards' rollouts."""
    return stages.agent_step_rewards(as_config(cfg), branch_uris, mc_uris, out)


@stage_task("pairs")
def pairs(cfg: dict, experts_uri: str, branch_uris: list[str], expert_rewards_uri: str, agent_rewards_uri: str, iteration: int, out: str) -> str:
    """Stage 3: outcome and step contrastive pairs."""
    return stages.build_pairs(as_config(cfg), experts_uri, branch_uris, expert_rewards_uri, agent_rewards_uri, iteration, out)


@stage_task("train")
def train(cfg: dict, policy_uri: str, reference_uri: str, pairs_uri: str, experts_uri: str, iteration: int, out: str) -> str:
    """Stage 4: the mixed outcome-DPO + step-DPO + SFT loss (Eq. 10)."""
    return stages.train_iteration(as_config(cfg), policy_uri, reference_uri, pairs_uri, experts_uri, iteration, out)
