"""The pipeline's DAG, listed once: what runs, in which order, reading what.

The flow submits these nodes, ``ipr status`` lists them, ``ipr report`` and the
flow build their per-iteration rows from them, ``ipr explain`` walks them.
A node names a declared stage, its parameters and, per input, the node(s) it
reads; its key is its artifact's path in the run folder (from the declaration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ipr_core import store
from ipr_core.config import IPRConfig
from ipr_core.pipeline.runner import Call
from ipr_core.pipeline.stage import Stage
from ipr_core.pipeline.stages import SPLITS, STAGES, ipr_experts, n_shards, read_trajectories, scores_steps


@dataclass(frozen=True)
class Node:
    stage: str
    params: tuple[tuple[str, Any], ...]
    inputs: tuple[tuple[str, str | tuple[str, ...]], ...]  # input name -> node key(s)

    @property
    def spec(self) -> Stage:
        return STAGES[self.stage]

    @property
    def key(self) -> str:
        return self.spec.out_path(dict(self.params))

    @property
    def iteration(self) -> int | None:
        return dict(self.params).get("iteration")

    def call(self, run: str, uris: Mapping[str, Any] | None = None) -> Call:
        """This node as a call in ``run``; inputs from ``uris`` (key -> URI or future) or the layout."""
        def at(key: str) -> Any:
            return uris[key] if uris is not None and key in uris else store.join(run, key)

        inputs = {k: (at(v) if isinstance(v, str) else [at(x) for x in v]) for k, v in self.inputs}
        return Call(self.spec, store.join(run, self.key), dict(self.params), inputs)


def node(stage: str, **kw: Any) -> Node:
    """A node of ``stage``; keyword values that are nodes (or lists of nodes) are inputs."""
    spec = STAGES[stage]
    missing = set(spec.inputs + spec.params) ^ set(kw)
    if missing:
        raise TypeError(f"stage {stage!r}: arguments {sorted(missing)} do not match its declaration")
    inputs = tuple((k, kw[k].key if isinstance(kw[k], Node) else tuple(n.key for n in kw[k])) for k in spec.inputs)
    return Node(stage, tuple((k, kw[k]) for k in spec.params), inputs)


def shard_count(cfg: IPRConfig, experts_uri: str) -> int:
    """MC/exploration shards: from the experts when they exist, else 1 (a placeholder)."""
    if not store.exists(experts_uri):
        return 1
    return n_shards(cfg.mc.shard_size, len(ipr_experts(cfg, read_trajectories(experts_uri))))


def task_lists(cfg: IPRConfig) -> list[Node]:
    """The held-out task lists: test (reported) and, when env.val_tasks > 0, val (selects the best)."""
    return [node("eval-tasks", split=s) for s in SPLITS if s == "test" or cfg.env.val_tasks > 0]


def evaluations(model: Node, tasks: Sequence[Node], tag: str, iteration: int) -> list[Node]:
    """A model's evaluations, one per task list (test first)."""
    return [node("evaluate", model_uri=model, tasks_uri=t, tag=tag, iteration=iteration, split=dict(t.params)["split"]) for t in tasks]


def prologue(cfg: IPRConfig, shards: int) -> list[Node]:
    """Experts, base model, SFT, expert MC (once: the scorer is fixed) and the base/SFT evaluations."""
    experts, tasks = node("experts"), task_lists(cfg)
    base = node("base-model", experts_uri=experts)
    sft = node("sft", base_uri=base, experts_uri=experts)
    evals = evaluations(base, tasks, "base", -1) if cfg.pipeline.eval_base else []
    evals += evaluations(sft, tasks, "sft", 0)
    if not expert_mc_up_front(cfg):  # each iteration scores the expert steps its pairs compare
        return [experts, *tasks, base, sft, *evals]
    # Without step pairs (ETO) no step reward is used: no expert MC, unless every branch is scored.
    mc_shards = shards if scores_steps(cfg) else 0
    mc = [node("expert-mc", scorer_uri=sft, experts_uri=experts, shard=s) for s in range(mc_shards)]
    return [experts, *tasks, base, sft, *evals, *mc, node("expert-rewards", experts_uri=experts, mc_uris=mc)]


def expert_mc_up_front(cfg: IPRConfig) -> bool:
    """Whether every expert step is scored once, before iteration 1: mc.expert_steps=all,
    a reward model's labels (mc.mode reward_model / hybrid), or mc.score_all_branches.
    Else (mc.expert_steps=paired) each iteration scores the expert steps its pairs compare."""
    return cfg.mc.expert_steps == "all" or cfg.mc.mode != "rollouts" or cfg.mc.score_all_branches


def paired_expert_rewards(cfg: IPRConfig, k: int, sft: Node, experts: Node, explore: Sequence[Node]) -> list[Node]:
    """Iteration k's expert MC (mc.expert_steps=paired): one shard per exploration
    shard (none without step pairs), then the step rewards its pairs read (last)."""
    kw = {"scorer_uri": sft, "experts_uri": experts, "iteration": k}
    mc = [node("expert-mc-paired", branches_uri=e, shard=s, **kw) for s, e in enumerate(explore)] if scores_steps(cfg) else []
    return [*mc, node("expert-rewards-paired", branches_uris=explore, experts_uri=experts, mc_uris=mc, iteration=k)]


def uses_reward_model(cfg: IPRConfig, k: int) -> bool:
    """Whether iteration k's agent branches are scored by the learned reward model."""
    return cfg.mc.mode in ("reward_model", "hybrid") and k >= cfg.mc.reward_model_from and cfg.pairs.step_pairs


def reward_model_node(cfg: IPRConfig, shards: int, prologue_nodes: Sequence[Node]) -> Node:
    """The reward model, trained on the MC labels of the prologue (expert step
    rewards) and of the iterations before mc.reward_model_from."""
    by = {n.stage: n for n in prologue_nodes}
    policy, earlier = by["sft"], []
    for j in range(1, cfg.mc.reward_model_from):
        it = iteration(cfg, j, shards, prologue_nodes, policy)
        earlier += it
        policy = trained(it)
    return node(
        "reward-model", scorer_uri=by["sft"], experts_uri=by["experts"], expert_rewards_uri=by["expert-rewards"],
        branches_uris=[n for n in earlier if n.stage == "explore"], agent_rewards_uris=[n for n in earlier if n.stage == "agent-rewards"],
    )  # fmt: skip


def iteration(cfg: IPRConfig, k: int, shards: int, prologue_nodes: Sequence[Node], policy: Node) -> list[Node]:
    """Iteration k: explore -> agent MC -> agent step rewards -> pairs -> train -> evaluate
    (with mc.mode=reward_model, from mc.reward_model_from on: explore -> the reward
    model's step rewards -> pairs ...; the model itself is trained in its first iteration;
    hybrid adds MC for the targets the model leaves near a pair decision, then merges)."""
    by = {n.stage: n for n in prologue_nodes}
    experts, sft = by["experts"], by["sft"]
    explore = [node("explore", policy_uri=policy, experts_uri=experts, iteration=k, shard=s) for s in range(shards)]
    expert_mc = [] if expert_mc_up_front(cfg) else paired_expert_rewards(cfg, k, sft, experts, explore)
    expert_rewards = expert_mc[-1] if expert_mc else by["expert-rewards"]
    if uses_reward_model(cfg, k):
        rm = reward_model_node(cfg, shards, prologue_nodes)
        rewards = node("agent-rm-rewards", rm_uri=rm, branches_uris=explore, experts_uri=experts, iteration=k)
        mc = [rm] if k == cfg.mc.reward_model_from else []
        if cfg.mc.reward_model_experts:  # the expert side of the pairs from the model too (made once, with the model)
            expert_rewards = node("expert-rm-rewards", rm_uri=rm, experts_uri=experts)
            mc += [expert_rewards] if k == cfg.mc.reward_model_from else []
        if cfg.mc.mode == "hybrid":  # rollouts where the model's reward leaves the pair decision near its threshold
            mc.append(rewards)
            er = expert_rewards  # what the pairs compare against: the margins are theirs
            hybrid = [node("hybrid-mc", scorer_uri=sft, branches_uri=e, experts_uri=experts, expert_rewards_uri=er, rm_rewards_uri=rewards, iteration=k, shard=s) for s, e in enumerate(explore)]
            mc += hybrid
            rewards = node("hybrid-rewards", branches_uris=explore, experts_uri=experts, expert_rewards_uri=er, rm_rewards_uri=rewards, mc_uris=hybrid, iteration=k)
    else:
        kw = {"scorer_uri": sft, "experts_uri": experts, "expert_rewards_uri": expert_rewards, "iteration": k}
        mc = [node("agent-mc", branches_uri=e, shard=s, **kw) for s, e in enumerate(explore)] if scores_steps(cfg) else []
        rewards = node("agent-rewards", branches_uris=explore, experts_uri=experts, expert_rewards_uri=expert_rewards, mc_uris=mc, iteration=k)
    pairs = node("pairs", experts_uri=experts, branches_uris=explore, expert_rewards_uri=expert_rewards, agent_rewards_uri=rewards, iteration=k)
    reference = sft if cfg.training.ipr.reference == "sft" else policy
    model = node("train", policy_uri=policy, reference_uri=reference, pairs_uri=pairs, experts_uri=experts, iteration=k)
    tasks = [n for n in prologue_nodes if n.stage == "eval-tasks"]
    return [*explore, *expert_mc, *mc, rewards, pairs, model, *evaluations(model, tasks, f"iter-{k:02d}", k)]


def agent_rewards_node(nodes: Sequence[Node]) -> Node | None:
    """The agent step rewards an iteration's pairs are built from (MC's, the reward
    model's or hybrid's), found through the pairs node's input."""
    pairs = next((n for n in nodes if n.stage == "pairs"), None)
    if pairs is None:
        return None
    key = dict(pairs.inputs)["agent_rewards_uri"]
    return next(n for n in nodes if n.key == key)


def step_reward_keys(nodes: Sequence[Node], k: int) -> tuple[str, str] | None:
    """The keys of the expert and the agent step rewards iteration k's pairs read
    (expert: the prologue's, the iteration's own with mc.expert_steps=paired, or the
    reward model's); None when the plan has no iteration k."""
    pairs = next((n for n in nodes if n.stage == "pairs" and n.iteration == k), None)
    return None if pairs is None else (dict(pairs.inputs)["expert_rewards_uri"], dict(pairs.inputs)["agent_rewards_uri"])


def expert_mc_rewards(nodes: Sequence[Node]) -> list[Node]:
    """The nodes holding MC's expert step rewards: the prologue's, or each iteration's."""
    return [n for n in nodes if n.stage in ("expert-rewards", "expert-rewards-paired")]


def trained(nodes: Sequence[Node]) -> Node:
    """The model an iteration's nodes train."""
    return next(n for n in nodes if n.stage == "train")


def plan(cfg: IPRConfig, shards: int) -> list[Node]:
    """The whole run (every iteration, as if none stopped early), in submission order."""
    nodes = prologue(cfg, shards)
    policy = next(n for n in nodes if n.stage == "sft")
    for k in range(1, cfg.pipeline.iterations + 1):
        it = iteration(cfg, k, shards, nodes, policy)
        nodes += it
        policy = trained(it)
    return nodes


def run_plan(cfg: IPRConfig, run: str) -> list[Node]:
    return plan(cfg, shard_count(cfg, store.join(run, STAGES["experts"].out_path({}))))
