"""Small builders shared by tests (rows of every artifact kind)."""

from __future__ import annotations

from ipr_core.types import Step, Task, Trajectory


def traj(task_id="t0", n=3, reward=1.0, source="expert", traj_id=None) -> Trajectory:
    steps = tuple(Step(f"think {i}", f"act {i}", f"obs {i}", reward if i == n - 1 else 0.0) for i in range(n))
    return Trajectory(traj_id or f"{source}-{task_id}", Task(task_id, "fake", "train", 7), source, "sys", f"do {task_id}", steps, 0, reward, reward >= 1.0, True, 7, None)


def pair_row(i=0, kind="step") -> dict:
    return {
        "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": f"task {i}"}],
        "chosen": [{"role": "assistant", "content": "Thought: a\nAction: go"}],
        "rejected": [{"role": "assistant", "content": "Thought: b\nAction: stop"}],
        "pair_id": f"p{i}",
        "kind": kind,
        "task_id": f"t{i}",
        "step": 1,
        "chosen_source": "expert",
        "chosen_step_reward": 0.8,
        "rejected_step_reward": 0.2,
        "chosen_outcome": 1.0,
        "rejected_outcome": 0.0,
        "iteration": 1,
    }
