"""The step-reward audit's pairing and summary on hand-made data."""

from __future__ import annotations

import pytest

from helpers import traj
from ipr_core import audit
from ipr_core.types import Trajectory


def _branch(expert: Trajectory, j: int, reward: float) -> Trajectory:
    """An agent branch: the expert's first j steps, then its own steps to the end."""
    own = traj(expert.task.task_id, n=len(expert.steps), reward=reward, source="agent").steps[j:]
    return Trajectory(f"it01|{expert.traj_id}|j{j}", expert.task, "agent", expert.system, expert.instruction, expert.steps[:j] + own, j, reward, reward >= 1.0, True, 7, None)


def test_candidates_pair_the_expert_and_agent_step_at_one_prefix():
    e = traj("t0", n=4)
    b1, b2, b0 = _branch(e, 1, 0.0), _branch(e, 2, 1.0), _branch(e, 0, 0.0)
    rewards = [
        {"branch_id": e.traj_id, "step": 2, "reward": 0.8}, {"branch_id": e.traj_id, "step": 3, "reward": 0.9},
        {"branch_id": b1.traj_id, "step": 2, "reward": 0.1}, {"branch_id": b2.traj_id, "step": 3, "reward": 0.5},
    ]  # fmt: skip
    got = audit.candidates([e], [b0, b1, b2], rewards, sample=10, seed=0)
    assert sorted((et.step, at.branch_id) for et, at in got) == [(2, b1.traj_id), (3, b2.traj_id)]  # j = 0 has no step reward
    assert all(et.branch_id == e.traj_id for et, _ in got)
    assert len(audit.candidates([e], [b1, b2], rewards, sample=1, seed=0)) == 1
    assert audit.candidates([e], [b1, b2], rewards, sample=1, seed=0) == audit.candidates([e], [b2, b1], rewards, sample=1, seed=0)  # seeded, order-free


def test_summary_by_hand():
    rows = [
        # estimates order expert > agent, reference agrees; errors 0.1 and 0.2
        {"expert_estimate": 0.6, "agent_estimate": 0.2, "expert_reference": 0.7, "agent_reference": 0.4},
        # estimates reverse the reference; errors 0.3 and 0.3; over tau, not confirmed
        {"expert_estimate": 0.2, "agent_estimate": 0.6, "expert_reference": 0.5, "agent_reference": 0.3},
        # reference tie: not counted for agreement; errors 0 and 0.1; under tau
        {"expert_estimate": 0.5, "agent_estimate": 0.4, "expert_reference": 0.5, "agent_reference": 0.5},
    ]
    s = audit.summary(rows, tau=0.15)
    assert s["candidates"] == 3 and s["mae"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.3 + 0.0 + 0.1) / 6)
    assert (s["ordered"], s["direction_agreement"]) == (2, 0.5)
    assert (s["over_tau"], s["over_tau_confirmed"]) == (2, 0.5)
    assert audit.summary([], tau=0.1)["mae"] is None
