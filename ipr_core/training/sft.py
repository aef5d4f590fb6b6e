"""Stage 0: supervised fine-tuning on expert trajectories (IPR Eq. 1-2;
docs/algorithm.md, "Stage 0: SFT").

NLL on the assistant turns only: every step of an expert trajectory is a
target (n_prompt = 2: system + instruction), each seen through the same
history window the policy generates with (``conversation.segments``). The loss
is the mean NLL over the target tokens of the whole optimisation step (every
micro-batch and process), so gradient accumulation does not reweight tokens.
The shared loop (``training.loop``) on torch rather than TRL's SFTTrainer: it
shares the masks, the scorer and the checkpoint format with the IPR trainer,
and has no CPU-hostile defaults to switch off (docs/models.md, "CPU-safe
settings").
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

from ipr_core.config import SFTConfig
from ipr_core.conversation import trajectory_messages
from ipr_core.policies.checkpoint_io import checkpoint_dtype, load_tokenizer
from ipr_core.training.common import Runtime, TargetScorer, TrainResult, distinct_tokens, forward_segments, load_model, save_on_main, seed_everything, stage_name
from ipr_core.training.data import Encoded, encode_conversation
from ipr_core.training.loop import EpochBatches, Step, run_loop
from ipr_core.types import Message, Trajectory

log = logging.getLogger(__name__)

Demonstration = Union[Trajectory, Mapping[str, Any]]


def demonstration_messages(item: Demonstration) -> list[Message]:
    """The conversation of a demonstration: a Trajectory, a "trajectories" row
    or an "sft" row (``messages``, TRL's conversational format)."""
    if isinstance(item, Trajectory):
        return trajectory_messages(item.system, item.instruction, item.steps)
    if "messages" in item:
        return [{"role": m["role"], "content": m["content"]} for m in item["messages"]]
    if "steps" in item:
        t = Trajectory.from_row(item)
        return trajectory_messages(t.system, t.instruction, t.steps)
    raise ValueError(f"not a demonstration (Trajectory, trajectories row or sft row): keys {sorted(item)}")


def demonstration_segments(tok, items: Sequence[Demonstration], history: int | None, max_length: int) -> list[list[Encoded]]:
    """Tokenised SFT segments, grouped per demonstration (empty groups dropped)."""
    groups, lost = [], 0
    for item in items:
        segs, n_lost = encode_conversation(tok, demonstration_messages(item), 2, history, max_length)
        lost += n_lost
        if segs:
            groups.append(segs)
    if lost:
        log.warning("%d target turns longer than max_length=%d (with their context) were left out of SFT", lost, max_length)
    return groups


def train_sft(
    model_path: str | Path,
    trajectories: Sequence[Demonstration],
    cfg: SFTConfig,
    history: int | None,
    out_dir: str | Path,
    *,
    seed: int = 0,
    precision: str = "auto",
    progress: str | None = None,
    max_forward_tokens: int = 0,
    activation_checkpointing: bool = False,
) -> TrainResult:
    """Fine-tune ``model_path`` on the expert ``trajectories``; save model and
    tokenizer (safetensors) to ``out_dir``. Sized by ``cfg.epochs`` /
    ``cfg.max_steps``; a cut by ``cfg.max_time_s`` before ``cfg.min_steps``
    steps raises ``TrainingError`` and saves nothing."""
    t_call = time.perf_counter()
    if not trajectories:
        raise ValueError("SFT needs at least one expert trajectory")
    rt = Runtime.create(precision, max_forward_tokens, activation_checkpointing)
    rng = seed_everything(seed)
    tok = load_tokenizer(model_path)
    segs = [s for g in demonstration_segments(tok, trajectories, history, cfg.max_length) for s in g]
    if not segs:
        raise ValueError(f"no SFT segment fits max_length={cfg.max_length}")
    model = load_model(model_path, rt.device)
    scorer = rt.accelerator.prepare(TargetScorer(model))
    batches = EpochBatches.of(len(segs), cfg, rt.world, rng)
    name = stage_name("SFT", progress)
    log.info("%s: %d demonstrations, %d segments, %d steps of %d segments on %s (%s)", name, len(trajectories), len(segs), batches.steps, batches.global_batch, rt.device, rt.dtype or "fp32")
    objective = _SFTObjective(rt, scorer, tok.pad_token_id, segs)
    loop = run_loop(rt, model, scorer, batches, objective.step, cfg, scheduler=cfg.scheduler, name=name, progress=progress)
    save_on_main(rt, model, tok, out_dir, checkpoint_dtype(model_path))
    result = TrainResult.from_loop(loop, time.perf_counter() - t_call)
    log.info("%s done: %s", name, result.summary())
    return result


@dataclass(frozen=True, eq=False)
class _SFTObjective:
    """Eq. 2 over the segments of the expert trajectories, fixed for the call."""

    rt: Runtime
    scorer: nn.Module
    pad_id: int
    segs: Sequence[Encoded]

    def step(self, indices: list[int], micro: list[list[list[int]]]) -> "_SFTStep":
        tokens = sum(distinct_tokens([self.segs[i] for i in part]) for mb in micro for part in mb)
        return _SFTStep(self, micro, sum(self.segs[i].n_targets for i in indices), tokens)


class _SFTStep(Step):
    """One step of Eq. 2 as a token mean over the global step: each micro-batch
    contributes its summed NLL over the step's target tokens (``n_targets``)."""

    def __init__(self, obj: _SFTObjective, micro: list[list[list[int]]], n_targets: int, tokens: int):
        self.obj, self.micro, self.n_targets, self.tokens = obj, micro, n_targets, tokens
        self.loss_sum = 0.0

    def loss(self, m: int, part: list[int]) -> torch.Tensor:
        o = self.obj
        return -forward_segments(o.scorer, [o.segs[i] for i in part], o.pad_id, o.rt).sum() / self.n_targets

    def record(self, scaled: torch.Tensor, scale: float) -> None:
        self.loss_sum += scaled.item() / self.obj.rt.world  # the micro-batch's term; 0 for a placeholder

    def metrics(self) -> dict[str, float]:
        return {"loss": self.obj.rt.sum_over_processes([self.loss_sum])[0]}

    def postfix(self, h: Mapping[str, float]) -> dict[str, str]:
        return {"loss": f"{h['loss']:.4f}"}

    def describe(self, h: Mapping[str, float]) -> str:
        return f"loss {h['loss']:.4f} lr {h['lr']:.2e}"
