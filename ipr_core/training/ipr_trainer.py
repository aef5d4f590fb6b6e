"""Stage 4: the IPR trainer, L = w_o * outcome-DPO + w_s * step-DPO + w_sft * SFT (Eq. 10;
docs/algorithm.md, "Stage 4: the mixed loss").

Why not TRL's DPOTrainer (docs/models.md, "Why IPR has its own trainer
instead of TRL's DPOTrainer"): it scores every completion token, so in
a multi-turn completion the environment's observations would be targets; it
has no per-kind weights and no separate SFT dataset. Here:
- a side (prompt + chosen or rejected messages) is split by
  ``conversation.segments(prompt + side, n_prompt=len(prompt), history)`` and
  its log-prob is the sum over its segments' target tokens: the assistant
  turns of the continuation only, each with the context it was generated from;
- the reference log-probs are computed once, before training, and the
  reference model is freed (the SFT model, or the previous iteration's: the
  caller passes its path, see ``choose_reference``);
- the SFT term is the NLL of expert trajectories (paper) or of every pair's
  chosen side (reference code; it reuses the chosen forward pass);
- each step is ONE forward pass over all its sequences (chosen, rejected and
  expert segments), as TRL concatenates chosen and rejected.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ipr_core.config import IPRTrainConfig
from ipr_core.policies.adapters import save_chained
from ipr_core.policies.checkpoint_io import checkpoint_dtype, load_tokenizer
from ipr_core.training.common import (
    Runtime,
    TargetScorer,
    TrainResult,
    add_lora,
    distinct_tokens,
    forward_segments,
    load_model,
    release_memory,
    save_on_main,
    score_segments,
    seed_everything,
    stage_name,
)
from ipr_core.training.data import Encoded, encode_conversation
from ipr_core.training.loop import EpochBatches, IndexStream, Step, run_loop
from ipr_core.training.losses import dpo_loss, implicit_rewards, ipr_loss
from ipr_core.training.sft import Demonstration, demonstration_segments

log = logging.getLogger(__name__)

KINDS = ("outcome", "step")


@dataclass(frozen=True)
class EncodedPair:
    pair_id: str
    kind: str  # outcome | step
    chosen: tuple[Encoded, ...]  # segments of prompt + chosen
    rejected: tuple[Encoded, ...]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.chosen + self.rejected)


def encode_pairs(tok, pairs: Sequence[Mapping], history: int | None, max_length: int) -> list[EncodedPair]:
    """Tokenise "pairs" rows (TRL conversational columns + ``kind``).

    A pair is dropped (with one summary warning) when a side has no target
    token left, e.g. a side of observations only or a turn longer than
    ``max_length``; turns lost to truncation are counted too.
    """
    out, empty, lost = [], 0, 0
    for i, p in enumerate(pairs):
        if p["kind"] not in KINDS:
            raise ValueError(f"pair {p.get('pair_id', i)!r} has kind {p['kind']!r}; expected one of {KINDS}")
        prompt = list(p["prompt"])
        c, lc = encode_conversation(tok, prompt + list(p["chosen"]), len(prompt), history, max_length)
        r, lr = encode_conversation(tok, prompt + list(p["rejected"]), len(prompt), history, max_length)
        lost += lc + lr
        if c and r:
            out.append(EncodedPair(str(p.get("pair_id", i)), p["kind"], tuple(c), tuple(r)))
        else:
            empty += 1
    if empty or lost:
        log.warning("pairs: %d dropped (a side with no target turn within max_length=%d), %d target turns truncated away", empty, max_length, lost)
    return out


def _flatten(pairs: Sequence[EncodedPair]) -> tuple[list[Encoded], torch.Tensor]:
    """All segments of the pairs and, per segment, its side: i = chosen of pair i, P + i = rejected."""
    segs, owner = [], []
    for i, p in enumerate(pairs):
        segs += p.chosen
        owner += [i] * len(p.chosen)
    for i, p in enumerate(pairs):
        segs += p.rejected
        owner += [len(pairs) + i] * len(p.rejected)
    return segs, torch.tensor(owner, dtype=torch.long)


def _expert_segments(expert_groups: Sequence[Sequence[Encoded]], drawn: Sequence[int]) -> list[Encoded]:
    """The segments of the expert trajectories ``drawn`` for a micro-batch's SFT term."""
    return [s for g in drawn for s in expert_groups[g]]


def _sum_sides(per_seg: torch.Tensor, owner: torch.Tensor, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor]:
    sides = per_seg.new_zeros(2 * n_pairs).index_add(0, owner.to(per_seg.device), per_seg)
    return sides[:n_pairs], sides[n_pairs:]


@torch.no_grad()
def reference_logps(scorer: torch.nn.Module, pairs: Sequence[EncodedPair], pad_id: int, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi_ref of every chosen and rejected side (CPU float32), in one
    length-sorted pass: computed once before training, as TRL's
    ``precompute_ref_log_probs``."""
    segs, owner = _flatten(pairs)
    return _sum_sides(score_segments(scorer, segs, pad_id, rt), owner, len(pairs))


def choose_reference(cfg: IPRTrainConfig, sft_path: str, previous_path: str) -> str:
    """pi_ref per ``cfg.reference``: the SFT model, fixed (reference code), or
    the previous iteration's policy (ETO). For iteration 1 both are the SFT model."""
    return sft_path if cfg.reference == "sft" else previous_path


def _same_checkpoint(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def train_ipr(
    policy_path: str | Path,
    reference_path: str | Path,
    pairs: Sequence[Mapping],
    experts: Sequence[Demonstration],
    cfg: IPRTrainConfig,
    history: int | None,
    out_dir: str | Path,
    *,
    seed: int = 0,
    precision: str = "auto",
    progress: str | None = None,
    max_forward_tokens: int = 0,
    activation_checkpointing: bool = False,
) -> TrainResult:
    """Train iteration k's policy from iteration k-1's (``policy_path``) on
    ``pairs`` ("pairs" rows) and, with sft_target="expert", the ``experts``;
    save it to ``out_dir``. ``batch_size`` pairs per micro-batch and process;
    a step sees batch_size x grad_accum x processes pairs. Sized by
    ``cfg.epochs`` over the pairs / ``cfg.max_steps``; a cut by
    ``cfg.max_time_s`` before ``cfg.min_steps`` steps raises
    ``TrainingError``. Without a usable pair the policy is saved unchanged
    (steps = planned_steps = 0)."""
    t_call = time.perf_counter()
    name = stage_name("IPR", progress)
    rt = Runtime.create(precision, max_forward_tokens, activation_checkpointing)
    rng = seed_everything(seed)
    tok = load_tokenizer(policy_path)
    enc, expert_groups = _encode_data(tok, pairs, experts, cfg, history)
    model = load_model(policy_path, rt.device)
    save_dtype = checkpoint_dtype(policy_path)
    if not enc:
        log.warning("%s: no usable pairs: the policy is saved unchanged", name)
        if cfg.lora:  # fresh LoRA factors have B = 0: the adapter chain goes on with a zero delta
            model = add_lora(model, cfg.lora_r)
        _save(rt, model, tok, policy_path, out_dir, save_dtype, cfg.lora)
        return TrainResult(steps=0, wall_s=time.perf_counter() - t_call, train_s=0.0, tokens=0, planned_steps=0)
    ref_c, ref_r = _reference_pass(model, policy_path, reference_path, enc, tok.pad_token_id, rt)
    if cfg.lora:
        model = add_lora(model, cfg.lora_r)
    scorer = rt.accelerator.prepare(TargetScorer(model))
    batches = EpochBatches.of(len(enc), cfg, rt.world, rng)
    expert_stream = IndexStream(len(expert_groups), rng) if expert_groups else None
    objective = _IPRObjective(cfg, rt, scorer, tok.pad_token_id, enc, ref_c, ref_r, expert_groups, expert_stream)
    counts = {k: sum(p.kind == k for p in enc) for k in KINDS}
    log.info("%s: %s pairs, %d expert trajectories (sft_target=%s), %d steps of %d pairs on %s (%s)", name, counts, len(expert_groups), cfg.sft_target, batches.steps, batches.global_batch, rt.device, rt.dtype or "fp32")
    # The reference code's schedule: constant LR after warmup (docs/algorithm.md,
    # "Where the paper and the reference code disagree").
    loop = run_loop(rt, model, scorer, batches, objective.step, cfg, scheduler="constant_with_warmup", name=name, progress=progress)
    _save(rt, model, tok, policy_path, out_dir, save_dtype, cfg.lora)
    result = TrainResult.from_loop(loop, time.perf_counter() - t_call)
    log.info("%s done: %s", name, result.summary())
    return result


def _save(rt: Runtime, model, tok, policy_path: str | Path, out_dir: str | Path, dtype, lora: bool) -> None:
    """The merged checkpoint; with LoRA also its adapter against the base the
    adapter chain started from (ipr_core.policies.adapters), written first:
    merging consumes the LoRA layers."""
    if lora and rt.is_main:
        save_chained(model, policy_path, out_dir)
    save_on_main(rt, model, tok, out_dir, dtype)


def _encode_data(tok, pairs: Sequence[Mapping], experts: Sequence[Demonstration], cfg: IPRTrainConfig, history: int | None) -> tuple[list[EncodedPair], list[list[Encoded]]]:
    """The tokenised pairs and, when the SFT term is on expert trajectories, those."""
    enc = encode_pairs(tok, pairs, history, cfg.max_length)
    use_experts = cfg.sft_target == "expert" and cfg.w_sft > 0
    expert_groups = demonstration_segments(tok, experts, history, cfg.max_length) if use_experts else []
    if use_experts and not expert_groups:
        log.warning("sft_target='expert' but no expert trajectory was given: the SFT term is 0")
    return enc, expert_groups


def _reference_pass(model, policy_path: str | Path, reference_path: str | Path, enc: Sequence[EncodedPair], pad_id: int, rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs, once. When pi_ref is the policy's own starting point
    (iteration 1, or reference="previous") the loaded policy scores them;
    otherwise the reference model is loaded, used and freed."""
    t_ref = time.perf_counter()
    if _same_checkpoint(reference_path, policy_path):
        model.eval()
        ref = reference_logps(TargetScorer(model), enc, pad_id, rt)
    else:
        ref_model = load_model(reference_path, rt.device).eval()
        ref = reference_logps(TargetScorer(ref_model), enc, pad_id, rt)
        del ref_model
        release_memory()
    log.info("reference log-probs of %d pairs in %.1f s", len(enc), time.perf_counter() - t_ref)
    return ref


@dataclass(frozen=True)
class _StepPlan:
    """One optimisation step, planned before any forward pass. Every process
    draws the same plan, so each knows the global counts that normalise the
    terms of Eq. 10 (see ``ipr_loss``)."""

    pairs: list[list[list[int]]]  # [micro-batch][process] -> pair indices
    experts: list[list[list[int]]] | None  # same shape -> expert trajectories (sft_target="expert")
    n_outcome: int
    n_step: int
    n_sft: int  # SFT target tokens of the step
    tokens: int  # distinct-segment tokens the step forwards (all processes)


def _plan_step(indices: list[int], pairs: list[list[list[int]]], enc: Sequence[EncodedPair], expert_groups: Sequence[Sequence[Encoded]], expert_stream: IndexStream | None, cfg: IPRTrainConfig) -> _StepPlan:
    """The step's counts; ``pairs`` is ``indices`` split into micro-batches and processes."""
    # One expert trajectory per pair, drawn from its own shuffled stream.
    experts = [[expert_stream.take(len(part)) for part in mb] for mb in pairs] if expert_stream else None
    n_outcome = sum(enc[i].kind == "outcome" for i in indices)
    expert_segs = [s for mb in experts or [] for part in mb for s in _expert_segments(expert_groups, part)]
    if experts is not None:
        n_sft = sum(s.n_targets for s in expert_segs)
    elif cfg.sft_target == "chosen" and cfg.w_sft > 0:
        n_sft = sum(s.n_targets for i in indices for s in enc[i].chosen)
    else:
        n_sft = 0
    return _StepPlan(pairs, experts, n_outcome, len(indices) - n_outcome, n_sft, _step_tokens(pairs, experts, enc, expert_groups))


def _step_tokens(pairs: list[list[list[int]]], experts: list[list[list[int]]] | None, enc: Sequence[EncodedPair], expert_groups: Sequence[Sequence[Encoded]]) -> int:
    """Tokens the step forwards: each (micro-batch, process) forward pass
    (``_IPRStep.loss``) computes its distinct segments once (``forward_segments``)."""
    total = 0
    for m, mb in enumerate(pairs):
        for r, part in enumerate(mb):
            extra = _expert_segments(expert_groups, experts[m][r]) if experts else []
            total += distinct_tokens(_flatten([enc[i] for i in part])[0] + extra)
    return total


@dataclass(frozen=True, eq=False)
class _IPRObjective:
    """Eq. 10 over the encoded pairs (and expert trajectories), fixed for the call."""

    cfg: IPRTrainConfig
    rt: Runtime
    scorer: nn.Module
    pad_id: int
    enc: Sequence[EncodedPair]
    ref_c: torch.Tensor  # log pi_ref of each pair's chosen side
    ref_r: torch.Tensor  # ... and of its rejected side
    expert_groups: Sequence[Sequence[Encoded]]
    expert_stream: IndexStream | None  # draws the expert trajectories of the SFT term (sft_target="expert")

    def step(self, indices: list[int], micro: list[list[list[int]]]) -> "_IPRStep":
        return _IPRStep(self, _plan_step(indices, micro, self.enc, self.expert_groups, self.expert_stream, self.cfg))


class _IPRStep(Step):
    """One step of Eq. 10: the DPO terms of each micro-batch's pairs plus the
    SFT NLL (Eq. 2) of its expert segments or of its chosen sides, each term
    normalised by the step's global counts (``ipr_loss``)."""

    def __init__(self, obj: _IPRObjective, plan: _StepPlan):
        self.obj, self.plan = obj, plan
        self.micro, self.tokens = plan.pairs, plan.tokens
        self.acc = _Metrics()
        self._terms: tuple[torch.Tensor, ...] | None = None  # the last micro-batch's, for record()

    def loss(self, m: int, part: list[int]) -> torch.Tensor:
        o, plan, cfg = self.obj, self.plan, self.obj.cfg
        batch = [o.enc[i] for i in part]
        extra = _expert_segments(o.expert_groups, plan.experts[m][o.rt.rank]) if plan.experts else []
        segs, owner = _flatten(batch)
        per_seg = forward_segments(o.scorer, segs + extra, o.pad_id, o.rt)
        pc, pr = _sum_sides(per_seg[: len(segs)], owner, len(batch))
        idx = torch.tensor(part)
        rc, rr = o.ref_c[idx].to(pc.device), o.ref_r[idx].to(pc.device)
        per_pair = dpo_loss(pc, pr, rc, rr, cfg.beta)
        is_outcome = torch.tensor([p.kind == "outcome" for p in batch], device=pc.device)
        # SFT NLL (Eq. 2): expert segments, or the chosen sides already scored.
        sft_nll = -per_seg[len(segs) :].sum() if plan.experts else (-pc.sum() if plan.n_sft else per_seg.new_zeros(()))
        loss = ipr_loss(per_pair, is_outcome, sft_nll, n_outcome=plan.n_outcome, n_step=plan.n_step, n_sft_tokens=plan.n_sft, w_outcome=cfg.w_outcome, w_step=cfg.w_step, w_sft=cfg.w_sft)
        self._terms = (loss, per_pair, is_outcome, sft_nll, pc, pr, rc, rr)
        return loss

    def record(self, scaled: torch.Tensor, scale: float) -> None:
        loss, per_pair, is_outcome, sft_nll, pc, pr, rc, rr = self._terms
        self._terms = None
        if scale:
            beta = self.obj.cfg.beta
            self.acc.add(loss, per_pair, is_outcome, sft_nll, implicit_rewards(pc, rc, beta), implicit_rewards(pr, rr, beta))

    def metrics(self) -> dict[str, float]:
        return self.acc.summary(self.obj.rt, self.plan.n_sft)

    def postfix(self, h: Mapping[str, float]) -> dict[str, str]:
        return {"loss": f"{h['total']:.4f}", "acc": f"{h['reward_acc']:.2f}"}


class _Metrics:
    """One step's metrics: sums over this process's micro-batches, then over
    all processes (one small all-reduce), so the history is exact under DDP."""

    FIELDS = ("total", "sft_nll", "dpo_outcome", "n_outcome", "dpo_step", "n_step", "chosen", "rejected", "correct", "pairs")

    def __init__(self):
        self.sums = dict.fromkeys(self.FIELDS, 0.0)

    def add(self, total: torch.Tensor, per_pair: torch.Tensor, is_outcome: torch.Tensor, sft_nll: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        total, per_pair, sft_nll, chosen, rejected = (t.detach() for t in (total, per_pair, sft_nll, chosen, rejected))
        vals = {
            "total": total,
            "sft_nll": sft_nll,
            "dpo_outcome": per_pair[is_outcome].sum(),
            "n_outcome": is_outcome.sum(),
            "dpo_step": per_pair[~is_outcome].sum(),
            "n_step": (~is_outcome).sum(),
            "chosen": chosen.sum(),
            "rejected": rejected.sum(),
            "correct": (chosen > rejected).sum(),
            "pairs": per_pair.numel(),
        }
        for k, v in vals.items():
            self.sums[k] += float(v)

    def summary(self, rt: Runtime, n_sft_tokens: int) -> dict[str, float]:
        s = dict(zip(self.FIELDS, rt.sum_over_processes([self.sums[k] for k in self.FIELDS])))
        out = {"total": s["total"]}
        for kind in KINDS:
            if s[f"n_{kind}"]:
                out[f"dpo_{kind}"] = s[f"dpo_{kind}"] / s[f"n_{kind}"]
        if n_sft_tokens:
            out["sft"] = s["sft_nll"] / n_sft_tokens
        n = max(s["pairs"], 1.0)
        out |= {"reward_acc": s["correct"] / n, "margin": (s["chosen"] - s["rejected"]) / n, "chosen_reward": s["chosen"] / n, "rejected_reward": s["rejected"] / n}
        return out
