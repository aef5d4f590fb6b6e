"""The losses of IPR as small pure functions over tensors.

Conventions: ``labels`` hold the token id at target positions and IGNORE (-100)
elsewhere; the logits at position t predict token t + 1. A sequence's log-prob
is the SUM over its target tokens (DPO, Rafailov et al. 2023; IPR Eq. 7, 9).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ipr_core.training.data import IGNORE


def target_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[N] log p(labels[n]) under logits [N, V], in float32 (bf16 log-softmax
    loses ~2 digits, which DPO's small log-ratio differences cannot afford)."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] summed log-probs of the target tokens of each sequence.

    logits [B, T, V], labels [B, T]. Only positions whose label is not IGNORE
    enter: the gradient w.r.t. the logits of any other position is exactly 0.
    """
    tgt = labels[:, 1:]
    mask = tgt != IGNORE
    per_token = target_logps(logits[:, :-1][mask], tgt[mask])
    rows = mask.nonzero()[:, 0]
    return per_token.new_zeros(labels.shape[0]).index_add(0, rows, per_token)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair sigmoid DPO loss (IPR Eq. 7 outcome-level, Eq. 9 step-level):
    -log sigmoid(beta * [(log pi(c) - log pi(r)) - (log pi_ref(c) - log pi_ref(r))])."""
    return -F.logsigmoid(beta * ((policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)))


def implicit_rewards(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """DPO's implicit reward beta * log(pi / pi_ref) of each side (for metrics)."""
    return beta * (policy - ref)


def ipr_loss(
    dpo_per_pair: torch.Tensor,
    is_outcome: torch.Tensor,
    sft_nll_sum: torch.Tensor,
    *,
    n_outcome: int,
    n_step: int,
    n_sft_tokens: int,
    w_outcome: float,
    w_step: float,
    w_sft: float,
) -> torch.Tensor:
    """IPR Eq. 10: L = w_o * L_outcome-DPO + w_s * L_step-DPO + w_sft * L_SFT.

    Each term is a mean over its own items: outcome pairs, step pairs, SFT
    target tokens. The counts are those of the whole optimisation step (every
    micro-batch and process), so summing this over the micro-batches of a step
    gives exactly Eq. 10 on the global batch, and the weights keep their
    meaning when a batch mixes kinds unevenly. A term with no items is 0.

    dpo_per_pair [P]: this micro-batch's per-pair DPO losses; is_outcome [P]
    bool; sft_nll_sum: the summed negative log-likelihood of this micro-batch's
    SFT target tokens (Eq. 2).
    """
    zero = dpo_per_pair.new_zeros(())
    lo = dpo_per_pair[is_outcome].sum() / n_outcome if n_outcome else zero
    ls = dpo_per_pair[~is_outcome].sum() / n_step if n_step else zero
    lsft = sft_nll_sum / n_sft_tokens if n_sft_tokens else zero
    return w_outcome * lo + w_step * ls + w_sft * lsft
