"""Every IPR stage, declared once (``@stage``): name, artifact path, output kind,
the config fields it reads (identity) and those that change only its cost.

Bodies take the context and their inputs' URIs and return data (``Rows`` or a
model ``Folder``); ``ipr_core.pipeline.runner`` decides whether to compute,
reuse or copy, and writes the artifact with its manifest. Tasks, flows, the
CLI's ``status`` / ``report`` / ``explain`` and the benchmarks all derive from
these declarations (``STAGES``).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

from ipr_core import ipr, mc_memo, store
from ipr_core.envs.base import make_env
from ipr_core.pipeline import memo
from ipr_core.pipeline.stage import Context, Folder, Rows, Stage, stage
from ipr_core.pipeline.view import value_at
from ipr_core.schemas import get_schema
from ipr_core.policies.base import SamplingParams
from ipr_core.types import Task, Trajectory

log = logging.getLogger(__name__)

# Field groups shared by several declarations.
ENV = ("env.name", "env.options", "env.max_steps")
EPISODES = ENV + ("sampling.history_turns", "sampling.max_new_tokens", "sampling.top_p", "model.backend", "model.dtype", "model.device", "model.openai.model", "model.openai.send_seed")
# Speed and memory only: changing them reuses finished artifacts (outputs may
# differ by float rounding in batched kernels, never by what is computed).
EPISODE_COST = (
    "env.workers", "env.concurrency", "sampling.batch_size", "sampling.prefix_sharing", "sampling.prefix_cache_mb",
    "model.replicas", "model.replica_threads", "model.trust_remote_code", "model.openai.base_url", "model.openai.api_key_env",
    "model.openai.timeout_s", "model.openai.max_concurrency", "model.openai.max_retries", "model.openai.backoff_s", "model.server",
)  # fmt: skip
TRAIN_SET = ("seed", "env.train_tasks")  # which expert trajectories IPR explores along
TRAIN_COST = ("training.max_forward_tokens", "training.activation_checkpointing")  # memory only


# --- helpers over the config view ------------------------------------------------------


def _env_factory(cfg):
    return partial(make_env, cfg.env.name, cfg.env.options, cfg.env.max_steps)


def _policy(cfg, model_uri: str) -> tuple[Any, dict[str, Any], Callable[[], None]]:
    """The stage's policy on ``model_uri``; for a served model also what its server
    reported serving (for the manifest) and the call that releases the server."""
    from ipr_core.policies.factory import make_policy

    if cfg.model.backend == "transformers":
        return make_policy(cfg.model, cfg.sampling, str(store.read_checkpoint(model_uri))), {}, lambda: None
    from ipr_core.policies.serving import connect

    served, release = connect(cfg.model, model_uri)
    return make_policy(cfg.model, cfg.sampling, model_uri, served), {"served": served.identity}, release


def _sampling(cfg, temperature: float) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_p=cfg.sampling.top_p, max_new_tokens=cfg.sampling.max_new_tokens)


def _train(ctx: Context, fn: Callable, *args: Any, seed: int):
    """``fn(*args, ctx.workdir, ...)`` (train_sft, train_ipr) on training.processes
    processes, with the stage's precision, progress label and memory settings
    (TRAIN_COST: they never change a result)."""
    from ipr_core.training.launch import run_processes

    t = ctx.cfg.training
    return run_processes(
        fn, t.processes, *args, ctx.workdir, seed=seed, precision=t.precision, progress=ctx.label,
        max_forward_tokens=t.max_forward_tokens, activation_checkpointing=t.activation_checkpointing,
    )  # fmt: skip


def _episodes(ctx: Context, model_uri: str, specs, temperature: float, on_episode=None) -> tuple[list[Trajectory], dict[str, int]]:
    """Play ``specs`` with the model at ``model_uri`` through the lock-step runner;
    also what it cost (generated tokens, where the backend counts them) and how
    many replies were malformed or actions invalid, for the manifest."""
    if not specs:
        return [], {}
    cfg = ctx.cfg
    policy, served, release = _policy(cfg, model_uri)
    counts: dict[str, int] = {}
    try:
        eps = ipr.run_specs(
            _env_factory(cfg), policy, specs, _sampling(cfg, temperature), history=cfg.sampling.history_turns,
            workers=cfg.env.workers, batch_size=cfg.sampling.batch_size, concurrency=cfg.env.concurrency, progress=ctx.label,
            on_episode=on_episode, on_stats=lambda st: counts.update(malformed_replies=st.malformed, invalid_actions=st.invalid),
        )  # fmt: skip
        stats = getattr(policy, "stats", None)
        return eps, {**served, **counts, **({"generated_tokens": int(stats.generated_tokens)} if stats is not None else {})}
    finally:
        close = getattr(policy, "close", None)
        if close:
            close()
        release()


def read_trajectories(uri: str, kind: str = "trajectories") -> list[Trajectory]:
    return [Trajectory.from_row(r) for r in store.read_rows(uri, kind)]


def successful(trajs: Sequence[Trajectory]) -> list[Trajectory]:
    return [e for e in trajs if e.error is None and e.success]


def ipr_experts(cfg, experts: Sequence[Trajectory]) -> list[Trajectory]:
    """The expert trajectories IPR explores along: the first train_tasks successful ones."""
    return successful(experts)[: cfg.env.train_tasks]


def n_shards(shard_size: int, n_items: int) -> int:
    return max(1, -(-n_items // shard_size))


def _shard(cfg, experts_uri: str, shard: int) -> list[Trajectory]:
    experts = ipr_experts(cfg, read_trajectories(experts_uri))
    size = cfg.mc.shard_size
    return experts[shard * size : (shard + 1) * size]


def _branches(uris: Sequence[str]) -> list[Trajectory]:
    return [b for u in uris for b in read_trajectories(u, "branches")]


def _list_tasks(cfg, split: str, n: int) -> list[Task]:
    env = _env_factory(cfg)()
    try:
        return env.list_tasks(split, n=n, seed=cfg.seed)
    finally:
        env.close()


# --- the stages ------------------------------------------------------------------------


@stage("experts", path="experts/train", kind="trajectories", reads=("seed", *ENV, "env.train_tasks", "training.sft.expert_episodes_multiplier"), needs="environment")
def collect_experts(ctx: Context) -> Rows:
    """Expert trajectories for SFT (train_tasks x multiplier) and IPR (the first train_tasks)."""
    from ipr_core.experts import collect_experts as collect

    cfg = ctx.cfg
    env = _env_factory(cfg)()
    try:
        n = cfg.env.train_tasks * cfg.training.sft.expert_episodes_multiplier
        trajs = collect(env, env.list_tasks("train", n=n, seed=cfg.seed), run_seed=cfg.seed, progress=ctx.label)
    finally:
        env.close()
    ok = sum(t.success for t in trajs)
    log.info("experts: %d/%d succeeded", ok, len(trajs))
    return Rows([t.to_row() for t in trajs], {"successes": ok})


SPLITS = ("test", "val")  # the held-out task lists: test (reported), val (selects the best iteration)


@stage("eval-tasks", path="tasks/{split}", kind="tasks", reads=("seed", *ENV, "env.eval_split", "env.eval_tasks", "env.val_split", "env.val_tasks"))
def eval_tasks(ctx: Context, split: str) -> Rows:
    """A held-out task list: ``split`` is ``test`` (env.eval_split) or ``val`` (env.val_split)."""
    e = ctx.cfg.env
    name, n = (e.eval_split, e.eval_tasks) if split == "test" else (e.val_split, e.val_tasks)
    return Rows([t.to_row() for t in _list_tasks(ctx.cfg, name, n)], {"split": name})


@stage("base-model", path="base/model", kind="checkpoint", reads=("seed", "model.base", "model.tiny"))
def base_model(ctx: Context, experts_uri: str) -> Folder:
    """The untrained base model: a tiny local model whose tokenizer is trained on
    the environment's text, or a user checkpoint (local folder) copied into the store."""
    cfg = ctx.cfg
    if cfg.model.base != "tiny":
        src = Path(cfg.model.base)
        if not src.is_dir():
            raise ValueError(f"model.base={cfg.model.base!r} is neither 'tiny' nor a local checkpoint folder")
        return Folder(src)
    from ipr_core.conversation import trajectory_messages
    from ipr_core.policies.tiny import build_tiny_model

    trajs = read_trajectories(experts_uri)[: cfg.model.tiny.tokenizer_corpus_episodes]
    corpus = [m["content"] for t in trajs for m in trajectory_messages(t.system, t.instruction, t.steps, include_last_observation=True, example=True)]
    return Folder(build_tiny_model(cfg.model.tiny, corpus, ctx.workdir / "model", seed=cfg.seed))


@stage("sft", path="sft/model", kind="checkpoint", reads=("seed", "training.sft", "training.precision", "training.processes", "sampling.history_turns"), cost=TRAIN_COST, needs="training")
def sft(ctx: Context, base_uri: str, experts_uri: str) -> Folder:
    """Stage 0 (Eq. 1-2): NLL on the successful expert trajectories' assistant turns."""
    from ipr_core.training.sft import train_sft

    cfg = ctx.cfg
    experts = successful(read_trajectories(experts_uri))
    base = str(store.read_checkpoint(base_uri))
    result = _train(ctx, train_sft, base, experts, cfg.training.sft, cfg.sampling.history_turns, seed=cfg.seed)
    return Folder(ctx.workdir, result.summary())


@stage("evaluate", path="eval/{split}/{tag}", kind="eval", reads=("seed", *EPISODES, "sampling.explore_temperature"), cost=EPISODE_COST, needs="generation")
def evaluate(ctx: Context, model_uri: str, tasks_uri: str, tag: str, iteration: int, split: str) -> Rows:
    """Greedy episodes on held-out tasks (``split``: test or val): one row per task."""
    tasks = [Task.from_row(r) for r in store.read_rows(tasks_uri, "tasks")]
    eps, cost = _episodes(ctx, model_uri, ipr.eval_specs(tasks, ctx.cfg.seed, tag), ctx.cfg.sampling.explore_temperature)
    rows = ipr.eval_rows(eps, tag, iteration)
    return Rows(rows, {**ipr.summarize_eval(rows), **cost})


MC = ("seed", *EPISODES, "mc.n_rollouts", "mc.temperature", "mc.memo_ignores_thoughts")
MC_COST = (*EPISODE_COST, "mc.memo", "mc.memo_flush")


def _scope(ctx: Context, scorer_uri: str) -> mc_memo.Scope:
    """The memo scope: the scorer's content digest and every setting its rollouts read."""
    return mc_memo.Scope(store.digest(scorer_uri), {p: value_at(ctx.cfg, p) for p in MC if p != "mc.memo_ignores_thoughts"})


def _memo_rows(ep: Trajectory, k: mc_memo.Keys) -> dict:
    [row] = ipr.mc_rollout_rows([ep])
    return {**row, "key": k.exact, "action_key": k.action}


def _mc(ctx: Context, scorer_uri: str, scope: mc_memo.Scope, targets: Sequence[ipr.MCTarget]) -> Rows:
    """Eq. 3-5's rollouts for ``targets``, drawing on the step-reward memo: one
    computation per distinct key (``mc.memo``), the rest reused; new estimates
    are added to the memo while the rollouts run."""
    cfg = ctx.cfg
    n, use_memo = cfg.mc.n_rollouts, cfg.mc.memo
    column = "action_key" if cfg.mc.memo_ignores_thoughts else "key"
    scored = [t for t in targets if not ipr.is_last_step(t)]
    keys = [mc_memo.keys(scope, t.traj, t.step, cfg.sampling.history_turns) for t in scored]
    lookup = [k.action if column == "action_key" else k.exact for k in keys]
    # what each target's estimate is filed under: its lookup key, or (memo off) itself
    slots = lookup if use_memo else [str(i) for i in range(len(scored))]
    known = mc_memo.complete_entries(memo.read(ctx.root, scope), n, column) if use_memo else {}
    todo: dict[str, int] = {}  # slot -> the target that computes it
    for i, slot in enumerate(slots):
        if lookup[i] not in known:
            todo.setdefault(slot, i)
    run = list(todo.values())
    index = {(scored[i].branch_id, scored[i].step): i for i in run}
    writer = memo.Writer(ctx.root, scope, n, cfg.mc.memo_flush, ctx.label) if use_memo else None
    fresh: dict[int, list[dict]] = {}  # computing target -> its rollouts (memo rows)

    def finished(ep: Trajectory) -> None:
        bid, step, _ = ipr.parse_mc_key(ep.traj_id)
        i = index[(bid, step)]
        row = _memo_rows(ep, keys[i])
        fresh.setdefault(i, []).append(row)
        if writer is not None:
            writer.add(row)

    specs = ipr.mc_specs([scored[i] for i in run], n, cfg.seed, keys=[keys[i].exact for i in run])
    try:
        _, cost = _episodes(ctx, scorer_uri, specs, cfg.mc.temperature, on_episode=finished)
    finally:
        if writer is not None:
            writer.write()  # what finished is kept, even when the stage fails
    computed = {slot: sorted(fresh[i], key=lambda r: r["rollout"]) for slot, i in todo.items()}
    rows = []
    for i, t in enumerate(scored):
        entry = known.get(lookup[i]) or computed[slots[i]]
        rows += [{**{c: e[c] for c in ROLLOUT_COLUMNS}, "branch_id": t.branch_id, "task_id": t.traj.task.task_id, "step": t.step} for e in entry]
    reused = len(scored) - len(run)
    meta = {"targets": len(targets), "estimates": len(scored), "rollouts": len(specs), "targets_reused": reused, "rollouts_reused": reused * n, **cost}
    return Rows(rows, meta)


ROLLOUT_COLUMNS = get_schema("mc_rollouts").schema.names  # a memo row carries them all


@stage("expert-mc", path="scorer/expert_mc/shard-{shard:03d}", kind="mc_rollouts", reads=(*MC, *TRAIN_SET, "mc.shard_size"), cost=MC_COST, needs="generation")
def expert_mc(ctx: Context, scorer_uri: str, experts_uri: str, shard: int) -> Rows:
    """Stage 1 for the expert: N scorer rollouts after every expert step (one shard)."""
    return _mc(ctx, scorer_uri, _scope(ctx, scorer_uri), ipr.expert_targets(_shard(ctx.cfg, experts_uri, shard)))


# What decides which branches agent MC scores (ipr.pairable_targets).
AGENT_TARGETS = (*TRAIN_SET, "pairs.tau_outcome", "pairs.step_pairs", "mc.score_all_branches")
# ... and, given the expert step rewards, which of those its rewards can still decide (ipr.decidable_targets)
DECIDABLE = (*AGENT_TARGETS, "pairs.tau_step", "mc.mode")


def pair_rules(cfg) -> ipr.PairRules:
    p = cfg.pairs
    return ipr.PairRules(p.tau_step, p.tau_outcome, p.step_variant, p.outcome_pairs, p.step_pairs)


def _agent_targets(cfg, branches: Sequence[Trajectory], experts: Sequence[Trajectory], expert_rewards_uri: str | None = None) -> tuple[list, list]:
    """The branches' MC targets (the agent's first own action), less those that cannot
    make a pair unless ``mc.score_all_branches``; and those left out. ``experts``: the
    expert trajectories IPR explores along (``ipr_experts``). With ``expert_rewards_uri``
    (the expert step rewards the pairs compare; mc.mode=rollouts), also less the
    targets whose expert reward leaves no step margin to win (``ipr.decidable_targets``)."""
    targets = ipr.branch_targets([(b.traj_id, b) for b in branches])
    if cfg.mc.score_all_branches:
        return targets, []
    outcomes = {e.traj_id: e.outcome_reward for e in experts}
    kept = ipr.pairable_targets(targets, outcomes, cfg.pairs.tau_outcome, cfg.pairs.step_pairs)
    if expert_rewards_uri is not None and cfg.mc.mode == "rollouts":
        expert_rewards = _by_target(store.read_rows(expert_rewards_uri, "step_rewards"))
        decidable = {(t.branch_id, t.step) for t in ipr.decidable_targets(kept, outcomes, expert_rewards, cfg.pairs.tau_outcome, cfg.pairs.tau_step)}
        kept = [t for t in kept if ipr.is_last_step(t) or (t.branch_id, t.step) in decidable]  # a last step costs no rollout
    ids = {(t.branch_id, t.step) for t in kept}
    return kept, [t for t in targets if (t.branch_id, t.step) not in ids]


@stage("agent-mc", path="iter-{iteration:02d}/agent_mc/shard-{shard:03d}", kind="mc_rollouts", reads=(*MC, *DECIDABLE), cost=MC_COST, needs="generation")
def agent_mc(ctx: Context, scorer_uri: str, branches_uri: str, experts_uri: str, expert_rewards_uri: str, iteration: int, shard: int) -> Rows:
    """Stage 1 for the agent: N scorer rollouts after each branch's first own action
    (branches that cannot make a pair are skipped: ``mc.score_all_branches``), once
    the expert steps they are compared with have their rewards (``expert_rewards_uri``)."""
    cfg = ctx.cfg
    experts = ipr_experts(cfg, read_trajectories(experts_uri))
    branches = read_trajectories(branches_uri, "branches")
    targets, skipped = _agent_targets(cfg, branches, experts, expert_rewards_uri)
    out = _agent_mc(ctx, scorer_uri, experts, targets, skipped)
    by_outcome = len(_agent_targets(cfg, branches, experts)[1])  # the rest of the skipped: the expert's reward decided
    return Rows(out.rows, {**out.meta, "skipped_by_expert_reward": len(skipped) - by_outcome})


def _agent_mc(ctx: Context, scorer_uri: str, experts: Sequence[Trajectory], targets: Sequence[ipr.MCTarget], skipped: Sequence[ipr.MCTarget]) -> Rows:
    """Agent MC on ``targets``; ``skipped``: those left without rollouts (counted)."""
    cfg = ctx.cfg
    scope = _scope(ctx, scorer_uri)
    out = _mc(ctx, scorer_uri, scope, targets)
    same = _same_as_expert(scope, targets, {e.traj_id: e for e in experts}, cfg.sampling.history_turns)
    skipped_rollouts = cfg.mc.n_rollouts * sum(not ipr.is_last_step(t) for t in skipped)  # what mc_specs would have run
    return Rows(out.rows, {**out.meta, **same, "skipped_targets": len(skipped), "skipped_rollouts": skipped_rollouts})


def _same_as_expert(scope: mc_memo.Scope, targets: Sequence[ipr.MCTarget], experts, history: int | None) -> dict[str, int]:
    """How many scored branch steps equal the expert's step at the same prefix:
    thought and action alike (same memo key), and by action alone."""
    exact = action = 0
    for t in targets:
        e = experts.get(t.branch_id.split("|")[1])
        if ipr.is_last_step(t) or e is None or len(e.steps) < t.step:
            continue
        mine, theirs = (mc_memo.keys(scope, x, t.step, history) for x in (t.traj, e))
        exact += mine.exact == theirs.exact
        action += mine.action == theirs.action
    return {"same_step_as_expert": exact, "same_action_as_expert": action}


def _compared_expert_targets(cfg, branches: Sequence[Trajectory], experts_uri: str) -> list[ipr.MCTarget]:
    """The expert steps the branches agent MC scores are compared with."""
    experts = ipr_experts(cfg, read_trajectories(experts_uri))
    return ipr.compared_expert_targets(_agent_targets(cfg, branches, experts)[0], experts)


@stage("expert-mc-paired", path="iter-{iteration:02d}/expert_mc/shard-{shard:03d}", kind="mc_rollouts", reads=(*MC, *AGENT_TARGETS), cost=MC_COST, needs="generation")
def expert_mc_paired(ctx: Context, scorer_uri: str, branches_uri: str, experts_uri: str, iteration: int, shard: int) -> Rows:
    """Stage 1 for the expert, per iteration (``mc.expert_steps=paired``): N scorer
    rollouts after each expert step this shard's scored branches are compared with;
    a step an earlier iteration already estimated comes from the memo."""
    targets = _compared_expert_targets(ctx.cfg, read_trajectories(branches_uri, "branches"), experts_uri)
    return _mc(ctx, scorer_uri, _scope(ctx, scorer_uri), targets)


def _rewards(targets, mc_uris: Sequence[str]) -> Rows:
    rows = ipr.step_rewards(targets, [r for u in mc_uris for r in store.read_rows(u, "mc_rollouts")])
    return Rows(rows, ipr.reward_stats(rows))


@stage("expert-rewards", path="scorer/expert_rewards", kind="step_rewards", reads=TRAIN_SET)
def expert_rewards(ctx: Context, experts_uri: str, mc_uris: list[str]) -> Rows:
    """Eq. 3-5 over every expert step (once per scorer, reused by every iteration)."""
    return _rewards(ipr.expert_targets(ipr_experts(ctx.cfg, read_trajectories(experts_uri))), mc_uris)


@stage("expert-rewards-paired", path="iter-{iteration:02d}/expert_rewards", kind="step_rewards", reads=AGENT_TARGETS)
def expert_rewards_paired(ctx: Context, branches_uris: list[str], experts_uri: str, mc_uris: list[str], iteration: int) -> Rows:
    """Eq. 3-5 over the expert steps this iteration's pairs compare (``mc.expert_steps=paired``)."""
    return _rewards(_compared_expert_targets(ctx.cfg, _branches(branches_uris), experts_uri), mc_uris)


@stage("agent-rewards", path="iter-{iteration:02d}/agent_rewards", kind="step_rewards", reads=DECIDABLE)
def agent_rewards(ctx: Context, branches_uris: list[str], experts_uri: str, expert_rewards_uri: str, mc_uris: list[str], iteration: int) -> Rows:
    """Eq. 3-5 over the agent's first own action of every branch agent MC scored."""
    experts = ipr_experts(ctx.cfg, read_trajectories(experts_uri))
    return _rewards(_agent_targets(ctx.cfg, _branches(branches_uris), experts, expert_rewards_uri)[0], mc_uris)


EXPLORE_FROM = ("pairs.step_pairs", "mc.score_all_branches")  # what decides whether j >= 1 branches are explored


def scores_steps(cfg) -> bool:
    """Whether anything reads step rewards: step pairs, or every branch scored
    anyway. Without (ETO) no MC runs and only j = 0 branches are explored."""
    return cfg.pairs.step_pairs or cfg.mc.score_all_branches


@stage("explore", path="iter-{iteration:02d}/explore/shard-{shard:03d}", kind="branches", reads=(*EPISODES, *TRAIN_SET, "mc.shard_size", "sampling.explore_temperature", *EXPLORE_FROM), cost=EPISODE_COST, needs="generation")
def explore(ctx: Context, policy_uri: str, experts_uri: str, iteration: int, shard: int) -> Rows:
    """Stage 2: the current policy continues greedily from every expert prefix e_{1:j}
    (from the task's start only when no step pair or step reward will read j >= 1 branches)."""
    cfg = ctx.cfg
    specs = ipr.explore_specs(_shard(cfg, experts_uri, shard), iteration, cfg.seed, from_start_only=not scores_steps(cfg))
    eps, cost = _episodes(ctx, policy_uri, specs, ctx.cfg.sampling.explore_temperature)
    rows = ipr.branch_rows(eps, iteration)
    return Rows(rows, {"branches": len(rows), **cost})


@stage("pairs", path="iter-{iteration:02d}/pairs", kind="pairs", reads=(*TRAIN_SET, "pairs"))
def pairs(ctx: Context, experts_uri: str, branches_uris: list[str], expert_rewards_uri: str, agent_rewards_uri: str, iteration: int) -> Rows:
    """Stage 3 (Eq. 6-9): outcome pairs (j = 0) and step pairs (j >= 1)."""
    rewards = store.read_rows(expert_rewards_uri, "step_rewards") + store.read_rows(agent_rewards_uri, "step_rewards")
    rows = ipr.build_pairs(ipr_experts(ctx.cfg, read_trajectories(experts_uri)), _branches(branches_uris), rewards, pair_rules(ctx.cfg), iteration)
    counts = {"outcome": sum(r["kind"] == "outcome" for r in rows), "step": sum(r["kind"] == "step" for r in rows)}
    log.info("iteration %d pairs: %s", iteration, counts)
    return Rows(rows, counts)


@stage("train", path="iter-{iteration:02d}/model", kind="checkpoint", reads=("seed", "training.ipr", "training.precision", "training.processes", "sampling.history_turns"), cost=TRAIN_COST, needs="training")
def train(ctx: Context, policy_uri: str, reference_uri: str, pairs_uri: str, experts_uri: str, iteration: int) -> Folder:
    """Stage 4 (Eq. 10): outcome-DPO + step-DPO + SFT, starting from the previous policy."""
    from ipr_core.training.ipr_trainer import train_ipr

    cfg = ctx.cfg
    policy, reference = (str(store.read_checkpoint(u)) for u in (policy_uri, reference_uri))
    experts = successful(read_trajectories(experts_uri))
    pairs_rows = store.read_rows(pairs_uri, "pairs")
    result = _train(ctx, train_ipr, policy, reference, pairs_rows, experts, cfg.training.ipr, cfg.sampling.history_turns, seed=cfg.seed + iteration)
    if cfg.training.ipr.lora:  # the adapter's base, for model.server.mode=lora
        from ipr_core.policies.adapters import Base, write_base

        write_base(ctx.workdir, policy, Base(policy_uri, store.digest(policy_uri)))
    return Folder(ctx.workdir, result.summary())


# --- the learned step reward model (paper Table 5; mc.mode=reward_model) -----------------

RM_TRAIN = ("seed", "training.reward_model", "training.precision", "sampling.history_turns", "pairs.tau_step", *AGENT_TARGETS)


def _by_target(rows) -> dict[tuple[str, int], float]:
    """"step_rewards" rows as (branch id, step) -> reward."""
    return {(r["branch_id"], int(r["step"])): float(r["reward"]) for r in rows}


@stage("reward-model", path="reward_model/model", kind="checkpoint", reads=RM_TRAIN, cost=TRAIN_COST, needs="training")
def reward_model(ctx: Context, scorer_uri: str, experts_uri: str, expert_rewards_uri: str, branches_uris: list[str], agent_rewards_uris: list[str]) -> Folder:
    """A scalar head on the scorer, trained by MSE on the run's MC step rewards so far
    (expert steps, and the agent branches of the iterations before mc.reward_model_from),
    with the labels of held-out tasks kept out for its error and pair agreement."""
    from ipr_core.training.reward_model import held_out_split, labeled_steps, pair_agreement, train_reward_model

    cfg, rm = ctx.cfg, ctx.cfg.training.reward_model
    experts = ipr_experts(cfg, read_trajectories(experts_uri))
    expert_rows = store.read_rows(expert_rewards_uri, "step_rewards")
    rows = expert_rows + [r for u in agent_rewards_uris for r in store.read_rows(u, "step_rewards")]
    targets = ipr.expert_targets(experts) + _agent_targets(cfg, _branches(branches_uris), experts)[0]
    train, held = held_out_split(labeled_steps(targets, rows, cfg.sampling.history_turns), rm.held_out, cfg.seed)
    res = train_reward_model(str(store.read_checkpoint(scorer_uri)), train, held, rm, rm.max_length, ctx.workdir, seed=cfg.seed, precision=cfg.training.precision, progress=ctx.label, activation_checkpointing=cfg.training.activation_checkpointing)
    return Folder(ctx.workdir, {**res.summary(), **pair_agreement(res.held_out_pred, held, _by_target(expert_rows), cfg.pairs.tau_step)})


@stage("agent-rm-rewards", path="iter-{iteration:02d}/agent_rm_rewards", kind="step_rewards", reads=(*AGENT_TARGETS, "training.reward_model.max_length", "sampling.history_turns", "mc.n_rollouts"), needs="generation")
def agent_rm_rewards(ctx: Context, rm_uri: str, branches_uris: list[str], experts_uri: str, iteration: int) -> Rows:
    """Step rewards of the agent branches agent MC would score, from the reward
    model instead of rollouts (last steps keep their outcome, as with MC)."""
    cfg = ctx.cfg
    targets = _agent_targets(cfg, _branches(branches_uris), ipr_experts(cfg, read_trajectories(experts_uri)))[0]
    rows, scored = _rm_rows(cfg, rm_uri, targets)
    # what agent MC would have run for the same targets (the memo aside)
    return Rows(rows, {**ipr.reward_stats(rows), "targets": len(targets), "predicted": scored, "rollouts_avoided": cfg.mc.n_rollouts * scored})


@stage("expert-rm-rewards", path="reward_model/expert_rewards", kind="step_rewards", reads=(*TRAIN_SET, "training.reward_model.max_length", "sampling.history_turns"), needs="generation")
def expert_rm_rewards(ctx: Context, rm_uri: str, experts_uri: str) -> Rows:
    """mc.reward_model_experts: the expert steps' rewards from the reward model, for the
    pairs of the iterations it scores (last steps keep their outcome, as with MC). The
    model was trained on these steps' MC labels (all but the held-out tasks'), so on them
    it gives its smoothed fit of MC, from the same estimator as the agent side."""
    rows, scored = _rm_rows(ctx.cfg, rm_uri, ipr.expert_targets(ipr_experts(ctx.cfg, read_trajectories(experts_uri))))
    return Rows(rows, {**ipr.reward_stats(rows), "predicted": scored})


def _rm_rows(cfg, rm_uri: str, targets: Sequence[ipr.MCTarget]) -> tuple[list[dict], int]:
    """"step_rewards" rows of ``targets`` from the reward model (a last step: its outcome), and how many it scored."""
    from ipr_core.training.reward_model import context_of, load_reward_model, predict

    scored = [t for t in targets if not ipr.is_last_step(t)]
    model, tok = load_reward_model(store.read_checkpoint(rm_uri))
    pred = dict(zip([(t.branch_id, t.step) for t in scored], predict(model, tok, [context_of(t, cfg.sampling.history_turns) for t in scored], cfg.training.reward_model.max_length)))
    rows = []
    for t in targets:
        base = {"branch_id": t.branch_id, "task_id": t.traj.task.task_id, "step": t.step}
        last = ipr.is_last_step(t)
        rows.append({**base, "reward": float(t.traj.outcome_reward) if last else pred[(t.branch_id, t.step)], "n_rollouts": 0, "is_last": last})
    return rows, len(scored)


HYBRID = ("pairs.tau_step", "mc.hybrid_band")  # what decides which targets hybrid MC rolls out


def _near_decision(cfg, targets: Sequence[ipr.MCTarget], rm_rows, expert_rewards_uri: str, experts: Sequence[Trajectory]) -> tuple[list, list]:
    """(targets whose pair decision, with the reward model's reward (``rm_rows``),
    is within mc.hybrid_band of flipping: they get rollouts; the others)."""
    rm, er = _by_target(rm_rows), _by_target(store.read_rows(expert_rewards_uri, "step_rewards"))
    outcome = {e.traj_id: e.outcome_reward for e in experts}
    near, far = [], []
    for t in targets:
        eid = t.branch_id.split("|")[1]
        r_e, r_a = er.get((eid, t.step)), rm.get((t.branch_id, t.step))
        is_near = not ipr.is_last_step(t) and None not in (r_e, r_a) and ipr.near_step_decision(r_e, r_a, outcome[eid], t.traj.outcome_reward, cfg.pairs.tau_step, cfg.pairs.tau_outcome, cfg.mc.hybrid_band)
        (near if is_near else far).append(t)
    return near, far


@stage("hybrid-mc", path="iter-{iteration:02d}/hybrid_mc/shard-{shard:03d}", kind="mc_rollouts", reads=(*MC, *AGENT_TARGETS, *HYBRID), cost=MC_COST, needs="generation")
def hybrid_mc(ctx: Context, scorer_uri: str, branches_uri: str, experts_uri: str, expert_rewards_uri: str, rm_rewards_uri: str, iteration: int, shard: int) -> Rows:
    """mc.mode=hybrid: agent MC only for the targets whose pair decision the reward
    model leaves near its threshold; the model's reward stands for the others."""
    experts = ipr_experts(ctx.cfg, read_trajectories(experts_uri))
    targets, skipped = _agent_targets(ctx.cfg, read_trajectories(branches_uri, "branches"), experts)
    near, far = _near_decision(ctx.cfg, targets, store.read_rows(rm_rewards_uri, "step_rewards"), expert_rewards_uri, experts)
    out = _agent_mc(ctx, scorer_uri, experts, near, skipped)
    return Rows(out.rows, {**out.meta, "model_decided": sum(not ipr.is_last_step(t) for t in far)})


@stage("hybrid-rewards", path="iter-{iteration:02d}/hybrid_rewards", kind="step_rewards", reads=(*AGENT_TARGETS, *HYBRID, "mc.n_rollouts"))
def hybrid_rewards(ctx: Context, branches_uris: list[str], experts_uri: str, expert_rewards_uri: str, rm_rewards_uri: str, mc_uris: list[str], iteration: int) -> Rows:
    """MC's step reward where hybrid MC rolled out, the reward model's elsewhere."""
    cfg = ctx.cfg
    experts = ipr_experts(cfg, read_trajectories(experts_uri))
    rm_rows = store.read_rows(rm_rewards_uri, "step_rewards")
    near, far = _near_decision(cfg, _agent_targets(cfg, _branches(branches_uris), experts)[0], rm_rows, expert_rewards_uri, experts)
    from_mc = ipr.step_rewards(near, [r for u in mc_uris for r in store.read_rows(u, "mc_rollouts")])
    keep = {(t.branch_id, t.step) for t in far}
    rows = from_mc + [r for r in rm_rows if (r["branch_id"], int(r["step"])) in keep]
    decided = sum(not ipr.is_last_step(t) for t in far)
    return Rows(rows, {**ipr.reward_stats(rows), "mc_targets": len(near), "model_decided": decided, "rollouts_avoided": cfg.mc.n_rollouts * decided})


STAGES: dict[str, Stage] = {s.name: s for s in (collect_experts, eval_tasks, base_model, sft, evaluate, expert_mc, agent_mc, expert_mc_paired, expert_rewards, expert_rewards_paired, agent_rewards, explore, pairs, train, reward_model, agent_rm_rewards, expert_rm_rewards, hybrid_mc, hybrid_rewards)}
