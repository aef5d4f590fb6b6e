"""What SFT and the IPR trainer share besides the loop (``training.loop``):
runtime (device, precision, processes), loading, the target log-prob scorer
and results. Checkpoint files are ``ipr_core.policies.checkpoint_io``'s.

CPU-safe by construction (docs/models.md, "CPU-safe settings": TRL's bf16 and
gradient-checkpointing defaults break on CPU): precision "auto" is bf16
autocast only on CUDA with bf16 support, fp32 elsewhere; activation
checkpointing is non-reentrant and bit-exact (``checkpoint_layers``). Several
processes (GPUs, or gloo on CPU) come from ``training.launch`` (torchrun from a
stage) or ``accelerate launch`` (DDP via ``Accelerator.prepare``); one process
is the same code with a world size of 1.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

# checkpoint_dtype, load_tokenizer: re-exported, they were defined here before checkpoint_io.
from ipr_core.policies.checkpoint_io import checkpoint_dtype, load_tokenizer, save_checkpoint  # noqa: F401
from ipr_core.training.data import Encoded, collate
from ipr_core.training.losses import IGNORE, sequence_logps, target_logps

if TYPE_CHECKING:
    from ipr_core.training.loop import LoopResult

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")


# --- results ---------------------------------------------------------------------------


class TrainingError(RuntimeError):
    """Training did not do what was asked (e.g. the time cap cut it before
    ``min_steps`` optimizer steps): a failure, not transient, not retried."""


@dataclass(frozen=True)
class TrainResult:
    """What a training call did. ``history`` has one dict per optimiser step
    (SFT: loss, lr, grad_norm; IPR: total, dpo_outcome, dpo_step, sft,
    reward_acc, margin, ..., where a term absent from a step is absent from its
    dict rather than a misleading 0)."""

    steps: int  # optimiser steps that ran
    wall_s: float  # the whole call: loading, tokenising, reference pass, training, saving
    train_s: float  # the optimisation loop only
    tokens: int  # non-padding tokens forwarded through the policy in the loop (all processes)
    history: tuple[Mapping[str, float], ...] = field(default_factory=tuple)
    cut_by_time: bool = False  # the wall-clock cap (max_time_s) stopped the loop before planned_steps
    planned_steps: int = 0  # the steps the LR schedule was planned over
    processes: int = 1  # the world size (training.processes)

    @classmethod
    def from_loop(cls, loop: "LoopResult", wall_s: float) -> "TrainResult":
        return cls(loop.steps, wall_s, loop.train_s, loop.tokens, loop.history, loop.cut_by_time, loop.planned_steps, loop.processes)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s if self.train_s > 0 else 0.0

    def series(self, key: str) -> list[float]:
        return [h[key] for h in self.history if key in h]

    @property
    def losses(self) -> list[float]:
        """The optimised objective per step (IPR: Eq. 10's total; SFT: Eq. 2's NLL)."""
        return self.series("total") or self.series("loss")

    def summary(self) -> dict[str, Any]:
        """Flat JSON-able metrics for manifests (``final_loss`` = last objective;
        ``steps`` run of ``planned_steps``, ``cut_by_time`` when the cap cut them)."""
        out: dict[str, Any] = {
            "steps": self.steps,
            "planned_steps": self.planned_steps,
            "cut_by_time": self.cut_by_time,
            "processes": self.processes,
            "wall_s": round(self.wall_s, 3),
            "train_s": round(self.train_s, 3),
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "final_loss": self.losses[-1] if self.losses else None,
        }
        if self.history:
            for k, v in self.history[-1].items():
                out[f"final_{k}"] = v
        return out


def stage_name(kind: str, label: str | None) -> str:
    """What logs and errors call a training call: ``kind`` ("SFT", "IPR") and,
    in a pipeline, the artifact it trains (its progress label): "IPR (iter-01/model)"."""
    return f"{kind} ({label})" if label else kind


# --- runtime -----------------------------------------------------------------------------


@dataclass
class Runtime:
    """Device, autocast dtype and process group of one training call."""

    accelerator: Any
    dtype: torch.dtype | None  # autocast dtype; None = fp32
    # Padded tokens one forward pass may hold activations for (training.max_forward_tokens); 0 = no limit.
    max_forward_tokens: int = 0
    # Recompute each decoder layer's activations in the backward pass (training.activation_checkpointing).
    checkpoint_layers: bool = False

    @classmethod
    def create(cls, precision: str, max_forward_tokens: int = 0, checkpoint_layers: bool = False) -> "Runtime":
        from accelerate import Accelerator

        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}")
        # Mixed precision is our own autocast (below), so accelerate's global
        # state is always "no" and never conflicts between calls in one process.
        # cpu=True without CUDA: lets `torchrun`/`accelerate launch` run several CPU processes (gloo).
        acc = Accelerator(mixed_precision="no", cpu=not torch.cuda.is_available())
        cuda = acc.device.type == "cuda"
        if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
            raise ValueError("precision='bf16' but this GPU does not support bfloat16; use 'fp32'")
        bf16 = precision == "bf16" or (precision == "auto" and cuda and torch.cuda.is_bf16_supported())
        return cls(acc, torch.bfloat16 if bf16 else None, max_forward_tokens, checkpoint_layers)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def no_sync(self, module: nn.Module, skip: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of a step."""
        return self.accelerator.no_sync(module) if skip and self.world > 1 else contextlib.nullcontext()

    def sum_over_processes(self, values: list[float]) -> list[float]:
        """Element-wise sums over all processes (metrics; one small all-reduce)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(t, reduction="sum").tolist()

    def any_process(self, flag: bool) -> bool:
        """True on every process when it is True on one (e.g. the time budget)."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)


# --- models ----------------------------------------------------------------------------


def seed_everything(seed: int) -> random.Random:
    """Seed torch (weights of LoRA adapters, any sampling) and return the data-order RNG."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    return random.Random(seed)


def load_model(path: str | Path, device: torch.device):
    """A causal LM in fp32 (master weights; autocast does the bf16 math) with
    dropout off, so that the policy's log-probs before the first update equal
    the reference's (as TRL's ``disable_dropout``)."""
    from ipr_core.policies.checkpoint_io import load_causal_lm

    model = load_causal_lm(path, dtype=torch.float32)
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    model.config.use_cache = False
    return model.to(device)


def checkpoint_layers(model: nn.Module) -> bool:
    """Turn on transformers' activation checkpointing of every decoder layer:
    the forward keeps only each layer's input, and the backward recomputes the
    layer from it. The recomputation runs the same kernels on the same inputs,
    so the gradients are the same bit for bit (tests check it); the cost is
    one more forward per layer. The saving is what a layer holds for its
    backward: the attention probabilities ([B, heads, T, T] per layer) and
    the MLP's intermediate activations, most of a training step's memory. A
    model that cannot (``supports_gradient_checkpointing`` false) trains as
    before, with a warning; returns whether it is on."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(core, "supports_gradient_checkpointing", False):
        log.warning("%s does not support activation checkpointing: training keeps every layer's activations", type(core).__name__)
        return False
    # Newer transformers name it activation_checkpointing_enable; the old name warns there.
    enable = getattr(core, "activation_checkpointing_enable", None) or core.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    return True


def add_lora(model, r: int):
    """Wrap ``model`` with LoRA adapters on every linear layer (peft)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:  # pragma: no cover - peft is in the lora extra
        raise ImportError("training.ipr.lora=true needs peft: pip install 'ipr-flow[lora]'") from e
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))


def save_on_main(rt: Runtime, model: nn.Module, tok, out_dir: str | Path, dtype: torch.dtype | None) -> None:
    """Save the checkpoint (``save_checkpoint``) from the main process; every process waits for it."""
    if rt.is_main:
        save_checkpoint(model, tok, out_dir, dtype)
    rt.accelerator.wait_for_everyone()


def release_memory() -> None:
    """Give a freed model's memory back (call after ``del model``)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


class TargetScorer(nn.Module):
    """[B] summed log-probs of each sequence's target tokens.

    Wraps the causal LM so one module is what DDP prepares and calls. Fast path:
    run the backbone, then the LM head and the log-softmax only at target
    positions, never materialising [B, T, V] logits (context tokens, often
    most of a multi-turn segment, need hidden states but no logits). Models
    that transform their logits (soft-capping, scaling) take the plain forward.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        cfg = self.core.config.get_text_config()
        self.fast = all(getattr(cfg, k, None) is None for k in _LOGIT_TRANSFORMS) and self.core.base_model is not self.core

    @property
    def core(self):
        """The transformers model (inside a peft wrapper, LoRA layers injected)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return sequence_logps(logits, labels)
        core = self.core
        hidden = core.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        tgt = labels[:, 1:]
        mask = tgt != IGNORE
        logits = core.get_output_embeddings()(hidden[:, :-1][mask])
        per_token = target_logps(logits, tgt[mask])
        rows = mask.nonzero()[:, 0]
        return per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token)


def _length_chunks(segs: Sequence[Encoded], max_tokens: int) -> list[list[int]]:
    """Indices of ``segs`` sorted by length, cut into chunks of at most ``max_tokens``
    padded tokens (a segment longer than that is a chunk of its own)."""
    order = sorted(range(len(segs)), key=lambda i: len(segs[i]))
    chunks, i = [], 0
    while i < len(order):
        j = i + 1
        while j < len(order) and (j - i + 1) * len(segs[order[j]]) <= max_tokens:
            j += 1
        chunks.append(order[i:j])
        i = j
    return chunks


def _forward(scorer: nn.Module, segs: Sequence[Encoded], pad_id: int, rt: Runtime) -> torch.Tensor:
    ids, mask, labels = (x.to(rt.device) for x in collate(segs, pad_id))
    with rt.autocast():
        return scorer(ids, mask, labels).float()


def distinct(segs: Sequence[Encoded]) -> tuple[list[Encoded], torch.Tensor]:
    """The distinct segments of ``segs`` (same tokens and targets; first
    occurrence order) and, per segment, its index among them.

    Equal segments have equal log-probs, and they are common: with a history
    window, a step pair's chosen side is the expert's remaining turns, each
    one the expert trajectory's own segment, which the task's outcome pair and
    the SFT term also hold. Computing each once and indexing it back gives the
    same values, and autograd sums the gradient over its uses: the gradients
    of forwarding every copy (up to float rounding), at the cost of one."""
    index: dict[tuple, int] = {}
    firsts, inverse = [], []
    for s in segs:
        k = index.setdefault((s.input_ids, s.target), len(index))
        if k == len(firsts):
            firsts.append(s)
        inverse.append(k)
    return firsts, torch.tensor(inverse, dtype=torch.long)


def distinct_tokens(segs: Sequence[Encoded]) -> int:
    """Tokens one ``forward_segments`` call over ``segs`` forwards (padding aside)."""
    return sum(len(s) for s in distinct(segs)[0])


def forward_segments(scorer: nn.Module, segs: Sequence[Encoded], pad_id: int, rt: Runtime) -> torch.Tensor:
    """[len(segs)] summed target log-probs; gradients flow. Each distinct
    segment is forwarded once (``distinct``).

    One forward pass when the padded batch fits ``rt.max_forward_tokens`` (or it
    is 0). Otherwise length-sorted chunks of at most that many padded tokens,
    each under activation checkpointing: a chunk's activations are recomputed in
    the backward pass instead of kept, so a step holds one chunk's activations,
    not those of every segment of its pairs and expert trajectories (an IPR step
    of 8 pairs with full-remainder sides is hundreds of segments). Same
    gradients, one extra forward per chunk."""
    segs, inverse = distinct(segs)
    budget = rt.max_forward_tokens
    if not budget or len(segs) * max(len(s) for s in segs) <= budget:
        vals = _forward(scorer, segs, pad_id, rt)
    else:
        from torch.utils.checkpoint import checkpoint

        chunks = _length_chunks(segs, budget)
        parts = [checkpoint(_forward, scorer, [segs[k] for k in c], pad_id, rt, use_reentrant=False) for c in chunks]
        order = torch.tensor([k for c in chunks for k in c])
        vals = torch.cat(parts)[torch.argsort(order).to(parts[0].device)]
    return vals[inverse.to(vals.device)]


@torch.no_grad()
def score_segments(scorer: nn.Module, segs: Sequence[Encoded], pad_id: int, rt: Runtime, max_tokens: int = 16384) -> torch.Tensor:
    """forward_segments without gradients over many segments: sorted by length
    and batched by padded size, so padding costs almost nothing. CPU float32."""
    segs, inverse = distinct(segs)
    out = torch.zeros(len(segs))
    for idx in _length_chunks(segs, max_tokens):
        out[idx] = _forward(scorer, [segs[k] for k in idx], pad_id, rt).cpu()
    return out[inverse]
