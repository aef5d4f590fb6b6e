"""Stage 0: supervised fine-tuning on expert trajectories (IPR Eq. 1-2).

NLL on the assistant turns only: every step of an expert trajectory is a
target (n_prompt = 2: system + instruction), each seen through the same
history window the policy generates with (``conversation.segments``). The loss
is the mean NLL over the target tokens of the whole optimisation step (every
micro-batch and process), so gradient accumulation does not reweight tokens.
A small loop on torch rather than TRL's SFTTrainer: it shares the masks, the
scorer and the checkpoint format with the IPR trainer, and has no CPU-hostile
defaults to switch off.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from ipr_core.config import SFTConfig
from ipr_core.conversation import trajectory_messages
from ipr_core.training.common import (
    Budget,
    EpochBatches,
    Runtime,
    TargetScorer,
    TrainResult,
    checkpoint_dtype,
    forward_segments,
    load_model,
    load_tokenizer,
    log_every,
    make_optimizer,
    micro_batches,
    optimizer_step,
    or_placeholder,
    progress_bar,
    save_checkpoint,
    seed_everything,
)
from ipr_core.training.data import Encoded, encode_conversation
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
) -> TrainResult:
    """Fine-tune ``model_path`` on the expert ``trajectories``; save model and
    tokenizer (safetensors) to ``out_dir``."""
    t_call = time.perf_counter()
    if not trajectories:
        raise ValueError("SFT needs at least one expert trajectory")
    rt = Runtime.create(precision)
    rng = seed_everything(seed)
    tok = load_tokenizer(model_path)
    segs = [s for g in demonstration_segments(tok, trajectories, history, cfg.max_length) for s in g]
    if not segs:
        raise ValueError(f"no SFT segment fits max_length={cfg.max_length}")
    model = load_model(model_path, rt.device)
    scorer = rt.accelerator.prepare(TargetScorer(model))
    global_batch = cfg.batch_size * cfg.grad_accum * rt.world
    batches = EpochBatches(len(segs), global_batch, cfg.epochs, rng)
    steps = batches.steps
    opt, sched = make_optimizer(model, cfg.lr, steps, cfg.warmup_ratio, cfg.scheduler, rt.device)
    log.info("SFT: %d demonstrations, %d segments, %d steps of %d segments on %s (%s)", len(trajectories), len(segs), steps, global_batch, rt.device, rt.dtype or "fp32")

    scorer.train()
    budget, bar, hist, tokens, stopped = Budget(cfg.max_time_s), progress_bar(steps, progress, rt), [], 0, False
    for step, indices in enumerate(batches):
        if rt.any_process(budget.spent()):
            stopped = True
            break
        plan = micro_batches(indices, cfg.grad_accum, rt.world)
        n_targets = sum(segs[i].n_targets for i in indices)
        loss_sum, lr = 0.0, sched.get_last_lr()[0]
        for m, parts in enumerate(plan):
            part, scale = or_placeholder(parts[rt.rank], indices, rt.world)
            if not part:
                continue
            batch = [segs[i] for i in part]
            with rt.no_sync(scorer, skip=m < cfg.grad_accum - 1):
                # Eq. 2 as a token mean over the global step; x world because DDP averages gradients.
                loss = -forward_segments(scorer, batch, tok.pad_token_id, rt).sum() / n_targets * rt.world * scale
                rt.accelerator.backward(loss)
            loss_sum += loss.item() / rt.world
        tokens += sum(len(segs[i]) for i in indices)
        grad_norm = optimizer_step(model, opt, sched)
        hist.append({"loss": rt.sum_over_processes([loss_sum])[0], "lr": lr, "grad_norm": grad_norm})
        bar.update(1)
        bar.set_postfix(loss=f"{hist[-1]['loss']:.4f}")
        if step % log_every(steps) == 0 or step == steps - 1:
            log.info("SFT step %d/%d loss %.4f lr %.2e", step + 1, steps, hist[-1]["loss"], lr)
    bar.close()
    train_s = budget.elapsed()
    if stopped:
        log.info("SFT stopped by its time budget (%.0f s) after %d/%d steps", cfg.max_time_s, len(hist), steps)
    if rt.is_main:
        save_checkpoint(model, tok, out_dir, checkpoint_dtype(model_path))
    rt.accelerator.wait_for_everyone()
    result = TrainResult(len(hist), time.perf_counter() - t_call, train_s, tokens, tuple(hist), stopped)
    log.info("SFT done: %s", result.summary())
    return result
