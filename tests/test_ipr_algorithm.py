"""Hand-computed checks of the IPR stages (docs/algorithm.md, Eq. 3-9)."""

import math

import pytest

from ipr_core import ipr
from ipr_core.schemas import from_rows
from ipr_core.types import Step, Task, Trajectory

TASK = Task("t0", "fake", "train", 11)


def T(traj_id, actions, outcome, prefix_len=0, done=True, error=None, source="expert"):
    steps = tuple(Step(f"th {a}", a, f"ob {a}", outcome if i == len(actions) - 1 else 0.0) for i, a in enumerate(actions))
    return Trajectory(traj_id, TASK, source, "SYS", "INSTR", steps, prefix_len, outcome, outcome >= 1.0, done, 11, error)


EXPERT = T("e0", ["a", "b", "c"], 1.0)


def roll(branch, step, i, reward, error=None):
    return {"branch_id": branch, "task_id": "t0", "step": step, "rollout": i, "seed": 0, "outcome_reward": reward, "n_steps": 2, "error": error}


def test_expert_targets_cover_every_step():
    assert [(t.branch_id, t.step) for t in ipr.expert_targets([EXPERT])] == [("e0", 1), ("e0", 2), ("e0", 3)]
    assert ipr.expert_targets([T("bad", ["a"], 0.0, error="boom")]) == []


def test_mc_means_and_last_step_rule():
    targets = ipr.expert_targets([EXPERT])
    rows = [roll("e0", 1, 0, 1.0), roll("e0", 1, 1, 0.0), roll("e0", 1, 2, 0.5), roll("e0", 1, 3, 0.0, error="crash"), roll("e0", 2, 0, 1.0), roll("e0", 2, 1, 1.0)]
    # step 3 has rollouts in the table but is the last step: its reward is the outcome (1.0)
    rows.append(roll("e0", 3, 0, 0.0))
    out = {r["step"]: r for r in ipr.step_rewards(targets, rows)}
    assert out[1]["reward"] == pytest.approx(0.5) and out[1]["n_rollouts"] == 3  # crashed rollout left out
    assert out[2]["reward"] == 1.0 and out[2]["n_rollouts"] == 2
    assert out[3] == {"branch_id": "e0", "task_id": "t0", "step": 3, "reward": 1.0, "n_rollouts": 0, "is_last": True}
    from_rows(list(out.values()), "step_rewards")


def test_missing_rollouts_give_no_reward_and_truncated_last_step_is_not_outcome():
    cut = T("e1", ["a", "b"], 0.0, done=False)  # cut by the step limit: not "finished"
    targets = ipr.expert_targets([cut])
    assert ipr.is_last_step(targets[-1]) is False
    out = ipr.step_rewards(targets, [roll("e1", 2, 0, 0.0, error="x")])
    assert out == []


def test_branch_targets_only_first_agent_action():
    b0 = T("it01|e0|j0", ["x", "y"], 0.0, source="agent")
    b1 = T("it01|e0|j1", ["a", "x", "y"], 0.0, prefix_len=1, source="agent")
    b2 = T("it01|e0|j2", ["a", "b"], 0.0, prefix_len=2, source="agent")  # ended during replay
    assert [(t.branch_id, t.step) for t in ipr.branch_targets([(b.traj_id, b) for b in (b0, b1, b2)])] == [("it01|e0|j1", 2)]


def test_mc_and_explore_specs_seeds_are_deterministic_and_distinct():
    pytest.importorskip("ipr_core.rollout")
    specs = ipr.mc_specs(ipr.expert_targets([EXPERT]), n_rollouts=3, run_seed=5)
    assert len(specs) == 2 * 3  # last step needs no rollouts
    assert [len(s.prefix) for s in specs] == [1, 1, 1, 2, 2, 2]
    assert len({s.seed for s in specs}) == 6
    assert [s.seed for s in specs] == [s.seed for s in ipr.mc_specs(ipr.expert_targets([EXPERT]), 3, 5)]
    assert specs[0].seed != ipr.mc_specs(ipr.expert_targets([EXPERT]), 3, 6)[0].seed
    ex = ipr.explore_specs([EXPERT], iteration=1, run_seed=5)
    assert [(s.key, len(s.prefix)) for s in ex] == [("it01|e0|j0", 0), ("it01|e0|j1", 1), ("it01|e0|j2", 2)]


RULES = ipr.PairRules(tau_step=0.1, tau_outcome=0.1)


def _rewards(expert_r, agent_r, j=1, bid=None):
    return [{"branch_id": "e0", "step": j + 1, "reward": expert_r}, {"branch_id": bid or f"it01|e0|j{j}", "step": j + 1, "reward": agent_r}]


def test_outcome_pair_both_directions_and_threshold():
    lose = T("it01|e0|j0", ["x", "y"], 0.0, source="agent")
    [p] = ipr.build_pairs([EXPERT], [lose], [], RULES, 1)
    assert p["kind"] == "outcome" and p["chosen_source"] == "expert" and p["step"] == 0
    assert p["prompt"] == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "INSTR"}]
    assert [m["content"] for m in p["chosen"]] == ["Thought: th a\nAction: a", "Observation: ob a", "Thought: th b\nAction: b", "Observation: ob b", "Thought: th c\nAction: c"]
    assert [m["content"] for m in p["rejected"]] == ["Thought: th x\nAction: x", "Observation: ob x", "Thought: th y\nAction: y"]
    assert (p["chosen_outcome"], p["rejected_outcome"]) == (1.0, 0.0) and p["chosen_step_reward"] is None
    weak = T("e0", ["a", "b", "c"], 0.3)
    win = T("it01|e0|j0", ["x"], 0.5, source="agent")
    [r] = ipr.build_pairs([weak], [win], [], RULES, 1)
    assert r["chosen_source"] == "agent" and r["chosen"][0]["content"].endswith("Action: x")
    # margins at exactly tau make no pair (strict >), just above do
    at = T("it01|e0|j0", ["x"], 0.9, source="agent")
    assert ipr.build_pairs([EXPERT], [at], [], ipr.PairRules(0.1, 0.1 + 1e-12), 1) == []
    assert len(ipr.build_pairs([EXPERT], [at], [], ipr.PairRules(0.1, 0.099), 1)) == 1


def test_step_pair_needs_both_conditions():
    b = T("it01|e0|j1", ["a", "x", "y"], 0.0, prefix_len=1, source="agent")
    [p] = ipr.build_pairs([EXPERT], [b], _rewards(0.8, 0.2), RULES, 1)
    assert p["kind"] == "step" and p["step"] == 1 and p["chosen_source"] == "expert"
    assert (p["chosen_step_reward"], p["rejected_step_reward"], p["chosen_outcome"], p["rejected_outcome"]) == (0.8, 0.2, 1.0, 0.0)
    # prompt = e_{1:1}: system, task, expert step 1 and its observation
    assert [m["content"] for m in p["prompt"]] == ["SYS", "INSTR", "Thought: th a\nAction: a", "Observation: ob a"]
    assert [m["content"] for m in p["chosen"]] == ["Thought: th b\nAction: b", "Observation: ob b", "Thought: th c\nAction: c"]
    assert [m["content"] for m in p["rejected"]] == ["Thought: th x\nAction: x", "Observation: ob x", "Thought: th y\nAction: y"]
    # step margin not met -> no pair, even though the outcome margin is
    assert ipr.build_pairs([EXPERT], [b], _rewards(0.3, 0.2), RULES, 1) == []
    # tie on step reward -> no pair
    assert ipr.build_pairs([EXPERT], [b], _rewards(0.5, 0.5), RULES, 1) == []
    # exactly at tau_s (0.1) -> no pair (strict)
    assert ipr.build_pairs([EXPERT], [b], _rewards(0.75, 0.25), ipr.PairRules(0.5, 0.1), 1) == []
    # outcome margin not met -> no pair
    tie = T("it01|e0|j1", ["a", "x"], 1.0, prefix_len=1, source="agent")
    assert ipr.build_pairs([EXPERT], [tie], _rewards(0.9, 0.1), RULES, 1) == []
    # missing agent reward -> no pair
    assert ipr.build_pairs([EXPERT], [b], _rewards(0.9, 0.1)[:1], RULES, 1) == []


def test_step_pair_reversed_when_agent_wins_both():
    weak = T("e0", ["a", "b", "c"], 0.2)
    b = T("it01|e0|j1", ["a", "z"], 0.9, prefix_len=1, source="agent")
    [p] = ipr.build_pairs([weak], [b], _rewards(0.1, 0.7), RULES, 1)
    assert p["chosen_source"] == "agent" and p["chosen"][0]["content"].endswith("Action: z")
    assert (p["chosen_step_reward"], p["rejected_step_reward"], p["chosen_outcome"], p["rejected_outcome"]) == (0.7, 0.1, 0.9, 0.2)
    # agent wins the step, expert wins the outcome: directions disagree -> no pair
    assert ipr.build_pairs([EXPERT], [b], _rewards(0.1, 0.7), ipr.PairRules(0.1, 0.05), 1) == []


def test_single_action_variant_and_identical_sides():
    b = T("it01|e0|j1", ["a", "x", "y"], 0.0, prefix_len=1, source="agent")
    [p] = ipr.build_pairs([EXPERT], [b], _rewards(0.8, 0.2), ipr.PairRules(0.1, 0.1, "single_action"), 1)
    assert [m["content"] for m in p["chosen"]] == ["Thought: th b\nAction: b"] and [m["content"] for m in p["rejected"]] == ["Thought: th x\nAction: x"]
    same = T("it01|e0|j1", ["a", "b"], 0.0, prefix_len=1, source="agent")
    same = Trajectory(same.traj_id, TASK, "agent", "SYS", "INSTR", (EXPERT.steps[0], EXPERT.steps[1]), 1, 0.0, False, False, 11)
    assert ipr.build_pairs([EXPERT], [same], _rewards(0.8, 0.2), ipr.PairRules(0.1, 0.1, "single_action"), 1) == []


def test_pairs_fit_schema_and_flags():
    lose = T("it01|e0|j0", ["x"], 0.0, source="agent")
    b = T("it01|e0|j1", ["a", "x"], 0.0, prefix_len=1, source="agent")
    rows = ipr.build_pairs([EXPERT], [lose, b], _rewards(0.8, 0.2), RULES, 1)
    assert sorted(r["kind"] for r in rows) == ["outcome", "step"]
    assert from_rows(rows, "pairs").num_rows == 2
    only_step = ipr.PairRules(0.1, 0.1, outcome_pairs=False)
    assert [r["kind"] for r in ipr.build_pairs([EXPERT], [lose, b], _rewards(0.8, 0.2), only_step, 1)] == ["step"]


def test_eval_summary_and_sft_rows():
    rows = ipr.eval_rows([EXPERT, T("x", ["q"], 0.25, source="eval")], "sft", 0)
    s = ipr.summarize_eval(rows)
    assert s["n"] == 2 and s["success_rate"] == 0.5 and math.isclose(s["mean_reward"], 0.625)
    sft = ipr.sft_rows([EXPERT, T("f", ["q"], 0.0)])
    assert len(sft) == 1 and sft[0]["messages"][-1]["content"] == "Thought: th c\nAction: c"
    from_rows(sft, "sft")


def test_an_in_context_example_is_shown_when_generating_and_left_out_of_sft_rows_and_pairs():
    import dataclasses

    from ipr_core.conversation import render_context, with_example, without_example
    from ipr_core.training.sft import demonstration_messages

    shown = with_example("EXAMPLE TASK\nThought: t\nAction: a\nObservation: o", "INSTR")
    e = dataclasses.replace(EXPERT, instruction=shown)
    assert without_example(shown) == "INSTR" and without_example("INSTR") == "INSTR"
    assert render_context(e.system, e.instruction, e.steps[:1], history=1)[1]["content"] == shown  # generation sees it
    b = dataclasses.replace(T("it01|e0|j1", ["a", "x", "y"], 0.0, prefix_len=1, source="agent"), instruction=shown)
    lose = dataclasses.replace(T("it01|e0|j0", ["x", "y"], 0.0, source="agent"), instruction=shown)
    pairs = ipr.build_pairs([e], [lose, b], _rewards(0.8, 0.2), RULES, 1)
    assert {p["kind"] for p in pairs} == {"outcome", "step"}
    plain = ipr.build_pairs([EXPERT], [dataclasses.replace(lose, instruction="INSTR"), dataclasses.replace(b, instruction="INSTR")], _rewards(0.8, 0.2), RULES, 1)
    assert pairs == plain  # the same pairs as without the example
    assert ipr.sft_rows([e]) == ipr.sft_rows([EXPERT]) and demonstration_messages(e) == demonstration_messages(EXPERT)
    with pytest.raises(ValueError, match="must not contain"):
        with_example(shown, "INSTR")


def _branches_around(expert):
    """j >= 1 branches with outcomes below, near and above the expert's (1.0 here)."""
    return [
        T("it01|e0|j1", ["a", "x", "y"], 0.0, prefix_len=1, source="agent"),  # fails: margin met
        T("it01|e0|j2", ["a", "b", "z"], 0.95, prefix_len=2, source="agent"),  # within tau_o: cannot pair
        T("it01|e1|j1", ["a", "q", "c"], 1.0, prefix_len=1, source="agent"),  # same outcome as e1's: cannot pair
    ]


def test_only_branches_that_can_make_a_step_pair_are_scored():
    targets = ipr.branch_targets([(b.traj_id, b) for b in _branches_around(EXPERT)])
    kept = ipr.pairable_targets(targets, {"e0": EXPERT.outcome_reward, "e1": 1.0}, RULES.tau_outcome)
    assert [t.branch_id for t in kept] == ["it01|e0|j1"]
    # no step pairs at all (ETO): nothing needs agent MC
    assert ipr.pairable_targets(targets, {"e0": 1.0}, 0.1, step_pairs=False) == []
    # a wider outcome margin rules the failing branch out too; tau_o = 0 keeps the near one
    assert ipr.pairable_targets(targets, {"e0": 1.0}, 1.0) == []
    assert [t.branch_id for t in ipr.pairable_targets(targets, {"e0": 1.0}, 0.0)] == ["it01|e0|j1", "it01|e0|j2"]


@pytest.mark.parametrize("agent_reward", [0.0, 0.3, 0.95, 1.0])
def test_pairs_from_skipped_branches_equal_pairs_from_all(agent_reward):
    """Skipping is exact: whatever step rewards the skipped branches would have had,
    build_pairs makes the same pairs from the scored subset."""
    branches = _branches_around(EXPERT)
    targets = ipr.branch_targets([(b.traj_id, b) for b in branches])
    experts = [EXPERT, T("e1", ["a", "b", "c"], 1.0)]
    expert_r = [{"branch_id": e, "step": s, "reward": 0.6} for e in ("e0", "e1") for s in (2, 3)]
    everyone = expert_r + [{"branch_id": t.branch_id, "step": t.step, "reward": agent_reward} for t in targets]
    kept = {(t.branch_id, t.step) for t in ipr.pairable_targets(targets, {"e0": 1.0, "e1": 1.0}, RULES.tau_outcome)}
    scored = expert_r + [r for r in everyone[len(expert_r):] if (r["branch_id"], r["step"]) in kept]
    assert len(scored) < len(everyone)
    for rules in (RULES, ipr.PairRules(0.1, 0.1, step_variant="single_action")):
        assert ipr.build_pairs(experts, branches, scored, rules, 1) == ipr.build_pairs(experts, branches, everyone, rules, 1)


@pytest.mark.parametrize("expert_reward", [0.0, 0.1, 0.1000001, 0.5, 0.9, 0.95, 1.0, None])
@pytest.mark.parametrize("expert_outcome", [0.0, 1.0])
def test_the_expert_reward_bound_skips_exactly_the_branches_no_reward_could_pair(expert_reward, expert_outcome):
    """decidable_targets keeps a branch iff SOME agent step reward in [0, 1] makes a
    step pair against that expert reward: checked against build_pairs on a grid of
    agent rewards (both directions: the expert's outcome above the branch's, and below)."""
    expert = T("e0", ["a", "b", "c"], expert_outcome)
    branch = T("it01|e0|j1", ["a", "x", "y"], 1.0 - expert_outcome, prefix_len=1, source="agent")
    [target] = ipr.branch_targets([(branch.traj_id, branch)])
    rewards = {("e0", 2): expert_reward} if expert_reward is not None else {}
    kept = ipr.decidable_targets([target], {"e0": expert_outcome}, rewards, RULES.tau_outcome, RULES.tau_step)
    expert_rows = [{"branch_id": "e0", "step": 2, "reward": expert_reward}] if expert_reward is not None else []
    grid = [i / 100 for i in range(101)]
    pairs = [ipr.build_pairs([expert], [branch], [*expert_rows, {"branch_id": branch.traj_id, "step": 2, "reward": r}], RULES, 1) for r in grid]
    assert bool(kept) == any(pairs), (expert_reward, expert_outcome)
