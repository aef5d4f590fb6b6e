"""The learned step reward model (paper Table 5): a scalar head trained with
MSE on the Monte Carlo step rewards the pipeline already computed.

What it learns from: each MC target (score action a_t of a trajectory) seen
as the scorer saw it when its rollouts started: the rendered context after
the step (``conversation.render_context`` within the scorer's history
window: system, task, the window of steps, a_t and its observation), labelled
with Eq. 3-5's estimate (the mean outcome of its N rollouts). Last steps of
finished episodes are not labels: their reward is the outcome itself, with
no rollouts, and stays so when the model scores.

The model is ``AutoModelForSequenceClassification`` with one label (a linear
``score`` head on the backbone's last non-padding token), initialised from the
scorer (the SFT model) so the backbone starts from what the scorer knows;
its checkpoint reloads with plain transformers. Training shares the SFT and
IPR trainers' loop (``training.loop``): steps sized by epochs, the same LR
schedules and the wall-clock safety cap.

Labels are split by task (``held_out_split``): a held-out task's steps never
train the model, so the held-out error measures generalisation to unseen
tasks, not to other steps of trajectories it has seen.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from ipr_core.config import RewardModelConfig
from ipr_core.conversation import render_context
from ipr_core.ipr import MCTarget, is_last_step, winner
from ipr_core.policies.checkpoint_io import load_tokenizer, save_tokenizer
from ipr_core.training.common import Runtime, TrainResult, seed_everything, stage_name
from ipr_core.training.loop import EpochBatches, Step, run_loop
from ipr_core.types import Message

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Labeled:
    """One step reward label: what the scorer was conditioned on, and its MC estimate."""

    target_id: str  # "{branch_id}#{step}"
    task_id: str
    messages: tuple[Message, ...]
    reward: float


def context_of(target: MCTarget, history: int | None) -> tuple[Message, ...]:
    """The scorer's context after action a_t of the target (where its rollouts start)."""
    t = target.traj
    return tuple(render_context(t.system, t.instruction, t.steps[: target.step], history))


def labeled_steps(targets: Iterable[MCTarget], reward_rows: Iterable[Mapping], history: int | None) -> list[Labeled]:
    """Labels from "step_rewards" rows (those with rollouts) joined to their targets."""
    by = {(r["branch_id"], int(r["step"])): float(r["reward"]) for r in reward_rows if not r["is_last"] and int(r["n_rollouts"]) > 0}
    out = []
    for tg in targets:
        reward = by.get((tg.branch_id, tg.step))
        if reward is not None and not is_last_step(tg):
            out.append(Labeled(f"{tg.branch_id}#{tg.step}", tg.traj.task.task_id, context_of(tg, history), reward))
    return out


def held_out_split(labels: Sequence[Labeled], fraction: float, seed: int) -> tuple[list[Labeled], list[Labeled]]:
    """(train, held out): a task is held out when its seeded hash falls below ``fraction``."""

    def held(task_id: str) -> bool:
        h = hashlib.sha256(f"{seed}|rm-split|{task_id}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64 < fraction

    train = [x for x in labels if not held(x.task_id)]
    return train, [x for x in labels if held(x.task_id)]


# --- the model -----------------------------------------------------------------------------


def encode(tok, messages: Sequence[Message], max_length: int) -> list[int]:
    """Token ids of the rendered context, its last ``max_length`` (the step being scored is at the end)."""
    text = tok.apply_chat_template(list(messages), tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"][-max_length:]


def _batch(rows: Sequence[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask: the head reads each row's last non-padding token."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


def _last_token_scores(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] scalar predictions at each row's last real token. Pooled here, by the
    mask, not by the pad id as transformers does: a tokenizer whose pad token is
    its end-of-turn token would otherwise pool the wrong position."""
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    last = mask.sum(-1) - 1
    return model.score(hidden[torch.arange(ids.shape[0], device=ids.device), last]).squeeze(-1).float()


def init_reward_model(scorer_path: str | Path, seed: int):
    """A one-label sequence classifier on the scorer's backbone; the head's
    initialisation is seeded."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    tok = load_tokenizer(scorer_path)
    model = AutoModelForSequenceClassification.from_pretrained(str(scorer_path), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model.config.problem_type = "regression"
    model.config.use_cache = False
    return model, tok


def load_reward_model(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) of a saved reward model, in eval mode."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    return model, load_tokenizer(path)


@torch.no_grad()
def predict(model: nn.Module, tok, contexts: Sequence[Sequence[Message]], max_length: int, batch_size: int = 32) -> list[float]:
    """The model's step reward for each context (length-sorted batches; clipped to [0, 1],
    the range of an MC estimate)."""
    rows = [encode(tok, c, max_length) for c in contexts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = [0.0] * len(rows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        ids, mask = _batch([rows[i] for i in idx], tok.pad_token_id, device)
        for i, v in zip(idx, _last_token_scores(model, ids, mask).clamp(0.0, 1.0).tolist()):
            out[i] = v
    model.train(was_training)
    return out


def agreement(pred: Sequence[float], labels: Sequence[Labeled]) -> dict[str, float]:
    """Mean absolute error against the MC labels."""
    if not labels:
        return {"mae": float("nan"), "n": 0}
    return {"mae": sum(abs(p - x.reward) for p, x in zip(pred, labels)) / len(labels), "n": len(labels)}


def pair_agreement(pred: Sequence[float], labels: Sequence[Labeled], expert_rewards: Mapping[tuple[str, int], float], tau_step: float) -> dict[str, float]:
    """How often the model decides Eq. 8-9's step-reward condition as MC does
    (expert step better by more than tau_s, agent step better, or neither, at
    the same prefix), over
    agent-branch labels (branch ids ``itKK|expert|jJ``, scored step J + 1) whose
    expert step has an MC reward. ``pair_agreement``: the model on the agent side,
    MC on the expert's (mc.mode=reward_model); ``pair_agreement_both``: the model on
    both sides where it scores the expert step too (mc.reward_model_experts; a
    last expert step keeps its outcome, as the pipeline's does)."""
    parsed = [_target(x) for x in labels]
    model_expert = {(parts[0], step): p for p, (parts, step) in zip(pred, parsed) if len(parts) == 1}
    same = both = n = 0
    for p, x, (parts, step) in zip(pred, labels, parsed):
        if len(parts) != 3:
            continue  # an expert step: no pair direction
        key = (parts[1], step)
        r_e = expert_rewards.get(key)
        if r_e is None:
            continue
        n += 1
        mc = winner(r_e, x.reward, tau_step)
        same += mc == winner(r_e, p, tau_step)
        both += mc == winner(model_expert.get(key, r_e), p, tau_step)
    nan = float("nan")
    return {"pair_agreement": same / n if n else nan, "pair_agreement_both": both / n if n else nan, "pair_n": n}


def _target(x: Labeled) -> tuple[list[str], int]:
    """A label's branch id split at ``|`` (one part: an expert trajectory; three:
    ``itKK|expert|jJ``, an agent branch) and its step (target id ``branch#step``)."""
    branch, step = x.target_id.rsplit("#", 1)
    return branch.split("|"), int(step)


# --- training ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardModelResult:
    train: TrainResult
    train_error: Mapping[str, float]
    held_out_error: Mapping[str, float]
    held_out_pred: tuple[float, ...]  # the model's reward for each held-out label, in order

    def summary(self) -> dict:
        return {**self.train.summary(), "train_mae": self.train_error["mae"], "held_out_mae": self.held_out_error["mae"], "held_out_labels": self.held_out_error["n"], "train_labels": self.train_error["n"]}


def train_reward_model(
    scorer_path: str | Path,
    train: Sequence[Labeled],
    held_out: Sequence[Labeled],
    cfg: RewardModelConfig,
    max_length: int,
    out_dir: str | Path,
    *,
    seed: int = 0,
    precision: str = "auto",
    progress: str | None = None,
    activation_checkpointing: bool = False,
) -> RewardModelResult:
    """Fit the head and backbone to ``train`` by MSE (the paper's loss); save
    model and tokenizer (safetensors) to ``out_dir``; report the mean absolute
    error on both splits."""
    t0 = time.perf_counter()
    if not train:
        raise ValueError("the reward model needs at least one MC step-reward label to train on")
    rt = Runtime.create(precision, checkpoint_layers=activation_checkpointing)
    rng = seed_everything(seed)
    model, tok = init_reward_model(scorer_path, seed)
    model = model.to(rt.device)
    rows = [encode(tok, x.messages, max_length) for x in train]
    targets = torch.tensor([x.reward for x in train], dtype=torch.float32)
    net = rt.accelerator.prepare(_Head(model))
    batches = EpochBatches.of(len(rows), cfg, rt.world, rng)
    name = stage_name("reward model", progress)
    log.info("%s: %d labels (%d held out), %d steps of %d on %s", name, len(train), len(held_out), batches.steps, batches.global_batch, rt.device)
    objective = _MSE(rt, net, tok.pad_token_id, rows, targets)
    loop = run_loop(rt, model, net, batches, objective.step, cfg, scheduler=cfg.scheduler, name=name, progress=progress)
    model.eval()
    preds = [predict(model, tok, [x.messages for x in split], max_length) for split in (train, held_out)]
    if rt.is_main:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        save_tokenizer(tok, out)
    rt.accelerator.wait_for_everyone()
    errors = [agreement(p, split) for p, split in zip(preds, (train, held_out))]
    result = RewardModelResult(TrainResult.from_loop(loop, time.perf_counter() - t0), *errors, tuple(preds[1]))
    log.info("%s done: %s", name, result.summary())
    return result


class _Head(nn.Module):
    """The module DDP prepares: ids, mask -> predictions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _last_token_scores(self.model, ids, mask)


@dataclass(frozen=True, eq=False)
class _MSE:
    rt: Runtime
    net: nn.Module
    pad_id: int
    rows: Sequence[list[int]]
    targets: torch.Tensor

    def step(self, indices: list[int], micro: list[list[list[int]]]) -> "_MSEStep":
        return _MSEStep(self, micro, len(indices), sum(len(self.rows[i]) for i in indices))


class _MSEStep(Step):
    """Mean squared error over the step's labels (all micro-batches and processes)."""

    def __init__(self, obj: _MSE, micro: list[list[list[int]]], n: int, tokens: int):
        self.obj, self.micro, self.n, self.tokens = obj, micro, n, tokens
        self.sse = 0.0

    def loss(self, m: int, part: list[int]) -> torch.Tensor:
        o = self.obj
        ids, mask = _batch([o.rows[i] for i in part], o.pad_id, o.rt.device)
        with o.rt.autocast():
            pred = o.net(ids, mask)
        return ((pred - o.targets[part].to(pred.device)) ** 2).sum() / self.n

    def record(self, scaled: torch.Tensor, scale: float) -> None:
        self.sse += scaled.item() / self.obj.rt.world

    def metrics(self) -> dict[str, float]:
        return {"mse": self.obj.rt.sum_over_processes([self.sse])[0]}

    def postfix(self, h: Mapping[str, float]) -> dict[str, str]:
        return {"mse": f"{h['mse']:.4f}"}
