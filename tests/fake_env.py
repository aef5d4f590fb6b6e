"""Fast deterministic fakes for rollout and policy tests.

- ``LineWorld``: an ``Environment`` on a number line. The agent starts at 0 and
  must reach a target cell (derived from the task seed) with "left"/"right".
  Microseconds per step, exact replay, an expert, and opt-in failure injection
  (``crash``) and latency (``step_delay_s``) for the runner's error and thread
  pool paths.
- ``ScriptedPolicy``: a ``Policy`` whose output is a pure function of (the
  conversation, the seed), so it is trivially batch-independent; it emits valid
  actions, invalid ones and malformed text, which drives every branch of the
  runner without a model.
- ``tiny_model``: builds a ~0.1 M-parameter model whose tokenizer is trained on
  LineWorld text (no download).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ipr_core.conversation import trajectory_messages
from ipr_core.envs.base import EnvError, StepResult
from ipr_core.policies.base import SamplingParams
from ipr_core.seeding import derive_seed
from ipr_core.types import Message, Step, Task

SYSTEM = "You walk on a line of cells. Reach the flag. Reply with 'Thought: ...' then 'Action: left' or 'Action: right'."


@dataclass
class Crash:
    """Failure injection shared by every LineWorld built with it (thread-safe).

    ``remaining[task_id]`` failures are raised, on ``reset`` or on the
    ``at_step``-th step of that task, then the task behaves normally.
    """

    remaining: dict[str, int] = field(default_factory=dict)
    on: str = "step"  # reset | step
    at_step: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)

    def maybe_raise(self, task_id: str, where: str, step: int) -> None:
        if where != self.on or (where == "step" and step != self.at_step):
            return
        with self.lock:
            if self.remaining.get(task_id, 0) > 0:
                self.remaining[task_id] -= 1
                raise EnvError(f"injected crash in {where} of {task_id}")


class LineWorld:
    name = "lineworld"

    def __init__(self, max_steps: int = 6, crash: Crash | None = None, step_delay_s: float = 0.0, registry: list | None = None):
        self.max_steps = max_steps
        self.crash = crash
        self.step_delay_s = step_delay_s
        self.closed = False
        self._task: Task | None = None
        self._pos = 0
        self._n = 0
        if registry is not None:  # lets tests check that every instance is closed
            registry.append(self)

    def list_tasks(self, split: str, n: int | None = None, seed: int = 0) -> list[Task]:
        return [Task(f"{split}-{i}", self.name, split, derive_seed(seed, split, i) % 10_000) for i in range(n or 8)]

    @staticmethod
    def target(task: Task) -> int:
        t = task.seed % 7 - 3  # -3..3, never 0
        return t if t != 0 else 2

    def system_prompt(self) -> str:
        return SYSTEM

    def reset(self, task: Task) -> str:
        if self.crash:
            self.crash.maybe_raise(task.task_id, "reset", 0)
        self._task, self._pos, self._n = task, 0, 0
        return f"You are at cell 0. The flag is at cell {self.target(task)}."

    def step(self, action: str) -> StepResult:
        assert self._task is not None, "step before reset"
        self._n += 1
        if self.crash:
            self.crash.maybe_raise(self._task.task_id, "step", self._n)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        target = self.target(self._task)
        a = {"l": "left", "r": "right"}.get(action.strip().lower(), action.strip().lower())  # aliases, canonicalised in info
        if a not in ("left", "right"):
            return StepResult(f"Nothing happens: {action!r} is not a valid action. You are at cell {self._pos}.", 0.0, False, {"success": False, "invalid": True})
        self._pos += 1 if a == "right" else -1
        if self._pos == target:
            # BabyAI-like: reaching the flag pays more the faster it happened.
            return StepResult(f"You reach the flag at cell {target}.", 1.0 - 0.5 * self._n / self.max_steps, True, {"success": True, "action": a})
        # Dense partial reward so the "reward stays the previous one" rule is visible.
        return StepResult(f"You are at cell {self._pos}. The flag is at cell {target}.", 0.01 * self._n, False, {"success": False, "action": a})

    def expert(self, task: Task) -> list[tuple[str, str]]:
        t = self.target(task)
        a = "right" if t > 0 else "left"
        return [(f"The flag is to the {a}.", a)] * abs(t)

    def close(self) -> None:
        self.closed = True


def expert_steps(env: LineWorld, task: Task) -> tuple[str, list[Step]]:
    """(instruction, steps) of the expert episode on ``task``."""
    instruction = env.reset(task)
    steps = []
    for thought, action in env.expert(task):
        r = env.step(action)
        steps.append(Step(thought, action, r.observation, r.reward))
        if r.done:
            break
    return instruction, steps


def corpus(n_tasks: int = 16) -> list[str]:
    env = LineWorld()
    out = []
    for task in env.list_tasks("train", n_tasks):
        instruction, steps = expert_steps(env, task)
        out += [m["content"] for m in trajectory_messages(SYSTEM, instruction, steps, include_last_observation=True)]
    return out


class ScriptedPolicy:
    """Output = f(conversation, seed): valid moves, invalid moves, malformed text."""

    def __init__(self, malformed_every: int = 5):
        self.malformed_every = malformed_every
        self.calls: list[int] = []  # batch size of every generate call

    def generate(self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams, seeds: Sequence[int]) -> list[str]:
        assert len(conversations) == len(seeds)
        self.calls.append(len(conversations))
        out = []
        for conv, seed in zip(conversations, seeds):
            h = derive_seed(seed, [m["content"] for m in conv])
            if h % self.malformed_every == 0:
                out.append("I am not sure what to do")  # no Action line
            elif h % 11 == 1:
                out.append("Thought: jump!\nAction: jump")  # invalid action
            else:
                move = "right" if (h >> 3) % 2 else "left"
                out.append(f"Thought: go {move}\nAction: {move}")
        return out

    def close(self) -> None:
        pass


class FailingPolicy(ScriptedPolicy):
    """ScriptedPolicy that fails on request: a conversation containing "boom"
    raises ``PolicyError`` (transient), one containing "die" kills the process."""

    def generate(self, conversations, sampling, seeds):
        text = " ".join(m["content"] for c in conversations for m in c)
        if "die" in text.split():
            import os

            os._exit(3)
        if "boom" in text.split():
            from ipr_core.policies.base import PolicyError

            raise PolicyError("scripted failure: boom")
        return super().generate(conversations, sampling, seeds)


def scripted_replica(rank: int, *, missing: str | None = None) -> ScriptedPolicy:
    """``build`` for ``ReplicatedPolicy`` tests (module level, so it pickles); ``missing``: fail like an absent checkpoint."""
    if missing:
        raise FileNotFoundError(f"no model at {missing}")
    return FailingPolicy()


def tiny_model(out_dir: str | Path, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, spread: float | None = None) -> Path:
    """A ~0.1 M-parameter Qwen2 with a tokenizer trained on LineWorld text.

    ``spread`` re-draws the weight matrices with that std: a freshly initialised
    model (std 0.02) greedily repeats one token, which would make equality
    tests trivially true; std ~0.15 gives varied, seed-sensitive text.
    """
    from ipr_core.config import TinyModelConfig
    from ipr_core.policies.tiny import build_tiny_model

    cfg = TinyModelConfig(hidden_size=hidden_size, num_layers=num_layers, num_heads=4, num_kv_heads=2, intermediate_size=2 * hidden_size, vocab_size=400, max_position_embeddings=2048)
    path = build_tiny_model(cfg, corpus(), out_dir, seed=seed)
    if spread:
        import torch
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, spread, generator=gen)
        model.save_pretrained(path, safe_serialization=True)
    return path


def conversations(n: int = 4) -> list[list[Message]]:
    """A few distinct LineWorld conversations of different lengths."""
    env = LineWorld()
    out = []
    for i, task in enumerate(env.list_tasks("test", n)):
        instruction, steps = expert_steps(env, task)
        msgs: list[Message] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": instruction}]
        for s in steps[: i % 3]:
            msgs += [{"role": "assistant", "content": s.assistant_text()}, {"role": "user", "content": "Observation: " + s.observation}]
        out.append(msgs)
    return out
