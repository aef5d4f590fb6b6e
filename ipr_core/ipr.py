"""The IPR algorithm (Xiong et al., EMNLP 2024) as pure functions over records.

Stages (docs/algorithm.md):
- Stage 1, step rewards by Monte Carlo (Eq. 3-5): ``mc_specs`` lists the scorer
  rollouts, ``step_rewards`` averages their outcomes.
- Stage 2, exploration along the expert: ``explore_specs`` lists, for every
  expert trajectory and step j, an agent episode starting from the prefix e_{1:j}.
- Stage 3, contrastive pairs (Eq. 6-9): ``build_pairs``.
- Evaluation: ``eval_specs`` + ``eval_rows`` + ``summarize_eval``.

Every function that needs a model or an environment takes them as arguments and
goes through the lock-step runner (``ipr_core.rollout``); everything else is a
plain function of data, unit-tested by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

from ipr_core.conversation import step_messages, trajectory_messages
from ipr_core.envs.base import Environment
from ipr_core.policies.base import Policy, SamplingParams
from ipr_core.seeding import derive_seed
from ipr_core.types import Trajectory

if TYPE_CHECKING:
    from ipr_core.rollout import RolloutStats

# ---------------------------------------------------------------------------------
# Stage 1: Monte Carlo step rewards (Eq. 3-5)
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MCTarget:
    """Score action a_t of ``traj`` (1-based t): rollouts start after steps[:t]."""

    branch_id: str
    traj: Trajectory
    step: int


def expert_targets(experts: Iterable[Trajectory]) -> list[MCTarget]:
    """Every step of every expert trajectory (computed once per scorer, reused)."""
    return [MCTarget(e.traj_id, e, t) for e in experts if e.error is None for t in range(1, len(e.steps) + 1)]


def branch_targets(branches: Iterable[tuple[str, Trajectory]]) -> list[MCTarget]:
    """The agent's first own action a'_{j+1} of each exploration branch (j >= 1).

    j = 0 branches only feed outcome pairs, which need no step reward.
    """
    out = []
    for branch_id, b in branches:
        if b.error is None and b.prefix_len >= 1 and len(b.steps) > b.prefix_len:
            out.append(MCTarget(branch_id, b, b.prefix_len + 1))
    return out


def can_make_step_pair(branch: Trajectory, expert_outcome: float, tau_outcome: float, step_pairs: bool = True) -> bool:
    """Whether a j >= 1 branch could make a step pair whatever its step reward.

    Eq. 8-9 ask for the step margin tau_s AND the outcome margin tau_o in the same
    direction, so a branch whose outcome is within tau_o of its expert's (or any
    branch, with step pairs off) makes no pair: its MC rollouts would change nothing.
    """
    return step_pairs and winner(expert_outcome, branch.outcome_reward, tau_outcome) is not None


def pairable_targets(targets: Sequence[MCTarget], expert_outcomes: Mapping[str, float], tau_outcome: float, step_pairs: bool = True) -> list[MCTarget]:
    """The branch targets whose step reward can decide a pair (``can_make_step_pair``,
    with ``pairs.tau_outcome`` and ``pairs.step_pairs``); ``expert_outcomes`` maps
    expert trajectory id -> outcome reward."""
    out = []
    for t in targets:
        expert_id = t.branch_id.split("|")[1]
        if expert_id in expert_outcomes and can_make_step_pair(t.traj, expert_outcomes[expert_id], tau_outcome, step_pairs):
            out.append(t)
    return out


def step_margin_reachable(r_expert: float | None, outcome_winner: str, tau_step: float) -> bool:
    """Whether some agent step reward in [0, 1] (a mean of outcomes, which the
    protocol keeps in [0, 1]) could win Eq. 8-9's step comparison against the
    expert's r_expert in the direction the outcomes already chose. The expert
    wins the step only if r_expert > r_agent + tau_s, so never when r_expert <= tau_s;
    the agent only if r_agent > r_expert + tau_s, so never when r_expert + tau_s >= 1.
    No expert reward (its rollouts all crashed): no pair either way."""
    if r_expert is None:
        return False
    return winner(r_expert, 0.0, tau_step) == "expert" if outcome_winner == "expert" else winner(r_expert, 1.0, tau_step) == "agent"


def decidable_targets(
    targets: Sequence[MCTarget], expert_outcomes: Mapping[str, float], expert_rewards: Mapping[tuple[str, int], float], tau_outcome: float, tau_step: float
) -> list[MCTarget]:
    """The pairable targets (``pairable_targets``) whose pair the agent's step reward
    can still decide, given the expert step it is compared with (``step_margin_reachable``):
    the others make no pair whatever their rollouts say."""
    out = []
    for t in targets:
        expert_id = t.branch_id.split("|")[1]
        w = winner(expert_outcomes[expert_id], t.traj.outcome_reward, tau_outcome)
        if w is not None and step_margin_reachable(expert_rewards.get((expert_id, t.step)), w, tau_step):
            out.append(t)
    return out


def compared_expert_targets(branch_targets: Sequence[MCTarget], experts: Iterable[Trajectory]) -> list[MCTarget]:
    """The expert steps Eq. 8-9 compare ``branch_targets`` with: r(e_{1:j+1}) for
    the branch at prefix j (whose target is its step j+1), each once, in the
    experts' order. Pairs need no other expert step reward."""
    need = {(t.branch_id.split("|")[1], t.step) for t in branch_targets}
    return [t for t in expert_targets(experts) if (t.branch_id, t.step) in need]


def is_last_step(target: MCTarget) -> bool:
    """The last step of a finished episode: its step reward is the outcome itself."""
    return target.step == len(target.traj.steps) and target.traj.done


def rollout_seed(run_seed: int, scorer: str, branch_id: str, step: int, rollout: int) -> int:
    return derive_seed(run_seed, "mc", scorer, branch_id, step, rollout)


def mc_specs(targets: Sequence[MCTarget], n_rollouts: int, run_seed: int, scorer: str = "sft", keys: Sequence[str] | None = None) -> list:
    """Scorer episodes for every non-last target: N per (branch, step), from the
    restored prefix steps[:t] (which ends in the action being scored).

    Seeds: given ``keys`` (the targets' memo keys, ``ipr_core.mc_memo``), from
    the key, so that equal keys get equal rollouts whoever proposed the step;
    otherwise from (run seed, scorer tag, branch, step, rollout).
    """
    from ipr_core.mc_memo import rollout_seed as keyed_seed
    from ipr_core.rollout import EpisodeSpec

    specs = []
    for n, tg in enumerate(targets):
        if is_last_step(tg):
            continue
        for i in range(n_rollouts):
            seed = keyed_seed(keys[n], i) if keys is not None else rollout_seed(run_seed, scorer, tg.branch_id, tg.step, i)
            specs.append(EpisodeSpec(key=f"{tg.branch_id}|{tg.step}|{i}", task=tg.traj.task, prefix=tuple(tg.traj.steps[: tg.step]), seed=seed, source="scorer"))
    return specs


def parse_mc_key(key: str) -> tuple[str, int, int]:
    branch_id, step, rollout = key.rsplit("|", 2)
    return branch_id, int(step), int(rollout)


def mc_rollout_rows(rollouts: Iterable[Trajectory]) -> list[dict]:
    """Rows of the ``mc_rollouts`` schema from finished scorer episodes."""
    rows = []
    for r in rollouts:
        branch_id, step, i = parse_mc_key(r.traj_id)
        rows.append(
            {
                "branch_id": branch_id,
                "task_id": r.task.task_id,
                "step": step,
                "rollout": i,
                "seed": r.seed,
                "outcome_reward": float(r.outcome_reward),
                "n_steps": len(r.steps) - r.prefix_len,
                "error": r.error,
            }
        )
    return rows


def step_rewards(targets: Sequence[MCTarget], rollout_rows: Iterable[Mapping]) -> list[dict]:
    """Eq. 3-5: r_s(s_t, a_t) = mean outcome of the N scorer rollouts from s_t, a_t.

    The last step of a finished episode takes the outcome reward itself (no
    rollouts). Rollouts that crashed are left out of the mean; a target whose
    rollouts all crashed gets no reward row (no pair is built on it).
    """
    by_target: dict[tuple[str, int], list[float]] = {}
    for r in rollout_rows:
        if r["error"] is None:
            by_target.setdefault((r["branch_id"], int(r["step"])), []).append(float(r["outcome_reward"]))
    rows = []
    for tg in targets:
        base = {"branch_id": tg.branch_id, "task_id": tg.traj.task.task_id, "step": tg.step}
        if is_last_step(tg):
            rows.append({**base, "reward": float(tg.traj.outcome_reward), "n_rollouts": 0, "is_last": True})
            continue
        outcomes = by_target.get((tg.branch_id, tg.step))
        if outcomes:
            rows.append({**base, "reward": math.fsum(outcomes) / len(outcomes), "n_rollouts": len(outcomes), "is_last": False})
    return rows


# ---------------------------------------------------------------------------------
# Stage 2: exploration along the expert trajectory
# ---------------------------------------------------------------------------------


def branch_id(iteration: int, expert_id: str, j: int) -> str:
    return f"it{iteration:02d}|{expert_id}|j{j}"


def explore_specs(experts: Sequence[Trajectory], iteration: int, run_seed: int, from_start_only: bool = False) -> list:
    """For every expert and j = 0..n-1: restore e_{1:j}, let the current policy
    act on its own to the end (j = 0 is a full episode from scratch).
    ``from_start_only``: j = 0 alone (ETO's exploration: without step pairs the
    j >= 1 branches feed nothing)."""
    from ipr_core.rollout import EpisodeSpec

    specs = []
    for e in experts:
        if e.error is not None:
            continue
        for j in range(1 if from_start_only else len(e.steps)):
            bid = branch_id(iteration, e.traj_id, j)
            specs.append(EpisodeSpec(key=bid, task=e.task, prefix=tuple(e.steps[:j]), seed=derive_seed(run_seed, "explore", iteration, e.traj_id, j), source="agent"))
    return specs


def branch_rows(branches: Iterable[Trajectory], iteration: int) -> list[dict]:
    """Rows of the ``branches`` schema (traj_id of each branch = its branch id)."""
    rows = []
    for b in branches:
        _, expert_id, _ = b.traj_id.split("|")
        rows.append({**b.to_row(), "branch_id": b.traj_id, "expert_traj_id": expert_id, "iteration": iteration})
    return rows


# ---------------------------------------------------------------------------------
# Stage 3: contrastive pairs (Eq. 6-9)
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairRules:
    tau_step: float
    tau_outcome: float
    step_variant: str = "full"  # full | single_action
    outcome_pairs: bool = True
    step_pairs: bool = True


def winner(expert_value: float, agent_value: float, tau: float) -> str | None:
    """'expert' if it wins by more than tau, 'agent' if the agent does, else None."""
    if expert_value > agent_value + tau:
        return "expert"
    if agent_value > expert_value + tau:
        return "agent"
    return None


def near_step_decision(r_expert: float, r_agent: float, expert_outcome: float, agent_outcome: float, tau_step: float, tau_outcome: float, band: float) -> bool:
    """Whether an agent step reward of ``r_agent`` leaves Eq. 8-9's step condition
    within ``band`` of flipping: the step margin, taken in the direction the
    outcomes already decide, is within ``band`` of tau_s. A branch the outcomes
    cannot pair is never near (no step reward changes it)."""
    w_out = winner(expert_outcome, agent_outcome, tau_outcome)
    if w_out is None:
        return False
    sign = 1.0 if w_out == "expert" else -1.0
    return abs(sign * (r_expert - r_agent) - tau_step) < band


def _pair(prompt, expert_side, agent_side, winner, **cols) -> dict | None:
    chosen, rejected = (expert_side, agent_side) if winner == "expert" else (agent_side, expert_side)
    if not chosen or not rejected or chosen == rejected:
        return None  # empty or identical sides teach nothing
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_source": winner, **cols}


def build_pairs(
    experts: Sequence[Trajectory],
    branches: Sequence[Trajectory],
    rewards: Iterable[Mapping],
    rules: PairRules,
    iteration: int,
) -> list[dict]:
    """Outcome pairs from j = 0 branches and step pairs from j >= 1 branches.

    - Outcome (Eq. 6-7): prompt = the task; the expert and the agent's full
      trajectory; whichever has the higher outcome by more than tau_o is chosen.
    - Step (Eq. 8-9): prompt = the expert prefix e_{1:j}; chosen/rejected = the
      expert remainder e_{j+1:n} vs. the agent's a'_{j+1} and its continuation
      (or just the two actions, ``single_action``). A pair needs BOTH the step
      reward margin tau_s and the outcome margin tau_o, in the same direction;
      when the agent wins both, the roles are reversed. A missing step reward
      (all rollouts crashed) makes no pair.
    Each row records its provenance and rewards (``pairs`` schema).
    """
    by_id = {e.traj_id: e for e in experts}
    sr = {(r["branch_id"], int(r["step"])): float(r["reward"]) for r in rewards}
    rows = []
    for b in branches:
        _, expert_id, jtxt = b.traj_id.split("|")
        e = by_id.get(expert_id)
        j = int(jtxt[1:])
        if e is None or b.error is not None or e.error is not None:
            continue
        base = {"task_id": e.task.task_id, "step": j, "iteration": iteration, "pair_id": b.traj_id}
        if j == 0:
            if not rules.outcome_pairs:
                continue
            w = winner(e.outcome_reward, b.outcome_reward, rules.tau_outcome)
            if w is None:
                continue
            prompt = trajectory_messages(e.system, e.instruction, [])
            row = _pair(prompt, step_messages(e.steps, False), step_messages(b.steps, False), w, kind="outcome", chosen_step_reward=None, rejected_step_reward=None)
        else:
            if not rules.step_pairs or len(b.steps) <= j:
                continue
            r_e, r_a = sr.get((e.traj_id, j + 1)), sr.get((b.traj_id, j + 1))
            if r_e is None or r_a is None:
                continue
            w_step = winner(r_e, r_a, rules.tau_step)
            w_out = winner(e.outcome_reward, b.outcome_reward, rules.tau_outcome)
            if w_step is None or w_step != w_out:
                continue
            w = w_step
            prompt = trajectory_messages(e.system, e.instruction, e.steps[:j], include_last_observation=True)
            if rules.step_variant == "single_action":
                e_side, a_side = step_messages(e.steps[j : j + 1], False), step_messages(b.steps[j : j + 1], False)
            else:
                e_side, a_side = step_messages(e.steps[j:], False), step_messages(b.steps[j:], False)
            win_r, lose_r = (r_e, r_a) if w == "expert" else (r_a, r_e)
            row = _pair(prompt, e_side, a_side, w, kind="step", chosen_step_reward=win_r, rejected_step_reward=lose_r)
        if row is None:
            continue
        co, ro = (e.outcome_reward, b.outcome_reward) if w == "expert" else (b.outcome_reward, e.outcome_reward)
        rows.append({**base, **row, "chosen_outcome": float(co), "rejected_outcome": float(ro)})
    return rows


# ---------------------------------------------------------------------------------
# Evaluation and SFT data
# ---------------------------------------------------------------------------------


def eval_specs(tasks: Sequence, run_seed: int, tag: str) -> list:
    from ipr_core.rollout import EpisodeSpec

    return [EpisodeSpec(key=f"eval|{tag}|{t.task_id}", task=t, seed=derive_seed(run_seed, "eval", tag, t.task_id), source="eval") for t in tasks]


def eval_rows(episodes: Iterable[Trajectory], model: str, iteration: int) -> list[dict]:
    return [
        {
            "task_id": ep.task.task_id,
            "model": model,
            "iteration": iteration,
            "outcome_reward": float(ep.outcome_reward),
            "success": bool(ep.success),
            "n_steps": len(ep.steps),
            "error": ep.error,
        }
        for ep in episodes
    ]


def summarize_eval(rows: Sequence[Mapping]) -> dict:
    n = len(rows)
    return {
        "n": n,
        "success_rate": sum(bool(r["success"]) for r in rows) / n if n else 0.0,
        "mean_reward": math.fsum(float(r["outcome_reward"]) for r in rows) / n if n else 0.0,
        "errors": sum(r["error"] is not None for r in rows),
    }


def sft_rows(experts: Iterable[Trajectory]) -> list[dict]:
    """Expert trajectories in TRL's conversational SFT format (``sft`` schema)."""
    return [
        {"messages": trajectory_messages(e.system, e.instruction, e.steps), "task_id": e.task.task_id, "traj_id": e.traj_id}
        for e in experts
        if e.error is None and e.success
    ]


def run_specs(
    make_env: Callable[[], Environment],
    policy: Policy,
    specs: Sequence,
    sampling: SamplingParams,
    *,
    history: int | None,
    workers: int = 1,
    batch_size: int | None = None,
    concurrency: int | None = None,
    progress: str | None = None,
    on_episode: Callable[[Trajectory], None] | None = None,
    on_stats: Callable[[RolloutStats], None] | None = None,
) -> list[Trajectory]:
    """Run episode specs through the lock-step runner (one place to change it);
    ``on_stats`` receives its ``RolloutStats``."""
    from ipr_core.rollout import run_episodes

    if not specs:
        return []
    return run_episodes(
        make_env, policy, specs, sampling, history=history, workers=workers, batch_size=batch_size, concurrency=concurrency, progress=progress,
        on_episode=on_episode, on_stats=on_stats,
    )  # fmt: skip


def reward_stats(rows: Sequence[Mapping]) -> dict:
    vals = [float(r["reward"]) for r in rows]
    if not vals:
        return {"n": 0, "mean": 0.0, "min": 0.0, "max": 0.0}
    return {"n": len(vals), "mean": math.fsum(vals) / len(vals), "min": min(vals), "max": max(vals)}
