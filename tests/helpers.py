"""Small builders shared by tests (rows of every artifact kind)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable

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


# A whole IPR run on BabyAI GoToObj in seconds (4 train / 4 eval tasks, a 32-wide 2-layer model, 1 iteration).
TINY_RUN = [
    "seed=3", "env.options={level: BabyAI-GoToObj-v0}", "env.train_tasks=4", "env.eval_tasks=4",
    "model.tiny={hidden_size: 32, num_layers: 2, num_heads: 2, num_kv_heads: 1, intermediate_size: 64, vocab_size: 320, max_position_embeddings: 512, tokenizer_corpus_episodes: 8}",
    "sampling.max_new_tokens=12", "sampling.history_turns=1", "mc.n_rollouts=2", "mc.shard_size=2",
    "training.sft.epochs=1", "training.sft.lr=0.001", "training.ipr.epochs=1", "training.ipr.batch_size=4", "pipeline.iterations=1",
]  # fmt: skip

# configs/demo.yaml shrunk for a deployment run by a worker (~1 min).
TINY_DEPLOY = [
    "env.train_tasks=2", "env.eval_tasks=2", "mc.n_rollouts=1", "mc.shard_size=2", "pipeline.iterations=1", "pipeline.eval_base=false",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.intermediate_size=64",
    "model.tiny.vocab_size=320", "model.tiny.tokenizer_corpus_episodes=4", "sampling.max_new_tokens=8", "sampling.history_turns=1",
    "training.sft.epochs=1", "training.sft.expert_episodes_multiplier=1", "training.ipr.epochs=1",
]


def wait_for(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout_s: float = 600) -> None:
    """Return once ``ready()``; fail if ``proc`` ends first (``what``: what it should have
    reached) or ``timeout_s`` passes."""
    deadline = time.time() + timeout_s
    while not ready():
        assert proc.poll() is None, f"ended before {what}"
        assert time.time() < deadline, f"{what} not reached within {timeout_s:.0f} s"
        time.sleep(0.05)


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], what: str, timeout_s: float = 600) -> None:
    """SIGKILL ``proc``'s process group (started with start_new_session=True) once ``ready()``."""
    wait_for(proc, ready, what, timeout_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
