"""Token ids and per-token target masks for training segments.

A segment is ``(messages, is_target per message)`` from
``ipr_core.conversation.segments``: the same windowed context the policy saw
when it generated each target turn. Only what the policy itself generated at a
target turn carries weight: everything the chat template emits after the
generation prompt (``add_generation_prompt=True``) up to and including the
end-of-turn token, i.e. the assistant content and ``<|im_end|>`` for ChatML.
System and user messages, observations, role headers, the newline the template
puts after ``<|im_end|>`` and assistant turns that are context (the expert
prefix of a step pair) are context with zero weight.

How: the whole segment is rendered once and tokenised once with character
offsets; each target turn's character span is found by rendering the messages
before it with the generation prompt, then with the turn itself. This needs no
``{% generation %}`` markers, so any HF chat template works, and two prefix
properties are checked loudly because training on a context the model never
sees at generation time is a silent bug:
1. text: the generation prompt of turn i is a prefix of the rendering with
   turn i, which is a prefix of the whole segment (templates that rewrite
   earlier turns, e.g. strip reasoning, fail here);
2. tokens: tokenising the generation prompt alone gives exactly the segment's
   first tokens (no BPE merge across the boundary), so the context tokens are
   the ones the policy is conditioned on when it generates.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from dataclasses import dataclass
from typing import Sequence

from ipr_core.conversation import segments
from ipr_core.types import Message

log = logging.getLogger(__name__)

IGNORE = -100  # the label of a context token (HF convention)


class TemplateError(ValueError):
    """The chat template cannot be used for target masks (prefix property broken)."""


@dataclass(frozen=True)
class Encoded:
    """One tokenised segment.

    ``target[t]`` is True when ``input_ids[t]`` is a token the policy generated
    at a target turn; its log-prob is log p(input_ids[t] | input_ids[:t]).
    """

    input_ids: tuple[int, ...]
    target: tuple[bool, ...]
    dropped_turns: int = 0  # target turns lost to left truncation

    @property
    def n_targets(self) -> int:
        return sum(self.target)

    def __len__(self) -> int:
        return len(self.input_ids)


def _render(tok, messages: Sequence[Message], generation_prompt: bool = False) -> str:
    if not messages and not generation_prompt:
        return ""
    return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _turn_end(turn: str, content: str, eos: str | None) -> int:
    """Length of the generated part of a rendered assistant turn: up to the end
    of the first end-of-turn token after the content; without one, up to the
    last non-space character (whatever the template appends is not generated)."""
    start = turn.find(content) if content else 0
    if start < 0:
        start = turn.find(content.strip())
        if start < 0:
            raise TemplateError(f"the chat template does not render the assistant content verbatim: {content[:60]!r} not in {turn[:120]!r}")
        content = content.strip()
    after = start + len(content)
    if eos:
        k = turn.find(eos, after)
        if k >= 0:
            return k + len(eos)
    return max(after, len(turn.rstrip()))


def encode_segment(tok, messages: Sequence[Message], is_target: Sequence[bool], max_length: int) -> Encoded | None:
    """Token ids + target mask of one segment, left-truncated to ``max_length``.

    Truncation removes context from the left; a target turn that loses any
    token loses its whole weight (a partly seen turn would be trained on a
    context it was not generated from). None when no target turn fits.
    """
    if len(messages) != len(is_target):
        raise ValueError(f"{len(messages)} messages but {len(is_target)} target flags")
    full = _render(tok, messages)
    spans = _target_spans(tok, messages, is_target, full)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    starts = [a for a, _ in enc["offset_mapping"]]
    target = [False] * len(ids)
    turn_tokens: list[tuple[int, int]] = []  # first and one-past-last token of each target turn
    for a, b, before in spans:
        first, last = bisect_left(starts, a), bisect_left(starts, b)  # offsets are non-decreasing
        prompt_ids = tok(before, add_special_tokens=False)["input_ids"]
        if prompt_ids != ids[:first]:
            raise TemplateError(
                f"tokens merge across the generation-prompt boundary ({tok.decode(ids[max(0, first - 2) : first + 2])!r}): "
                "the tokenised prompt is not a prefix of the tokenised conversation, so training would condition on other tokens than generation"
            )
        for j in range(first, last):
            target[j] = True
        turn_tokens.append((first, last))
    if not any(target):
        return None
    # Tokens after the last target (the template's trailing newline) cannot
    # influence any target log-prob in a causal model: do not compute them.
    end = len(target) - target[::-1].index(True)
    ids, target, dropped = _truncate_left(ids[:end], target[:end], turn_tokens, max_length)
    if not any(target):
        return None
    return Encoded(tuple(ids), tuple(target), dropped)


def _target_spans(tok, messages: Sequence[Message], is_target: Sequence[bool], full: str) -> list[tuple[int, int, str]]:
    """(char start, char end, generation prompt text) of each target turn in
    ``full``, the rendered segment; checks the text prefix property (1.)."""
    spans: list[tuple[int, int, str]] = []
    for i, flag in enumerate(is_target):
        if not flag:
            continue
        if messages[i]["role"] != "assistant":
            raise ValueError(f"target message {i} has role {messages[i]['role']!r}, expected 'assistant'")
        before = _render(tok, messages[:i], generation_prompt=True)
        upto = _render(tok, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError(
                f"chat template is not incremental at message {i}: the generation prompt is not a prefix of the rendered turn, "
                "or rendering later messages changes earlier text; the policy would be trained on a context it never sees"
            )
        end = len(before) + _turn_end(upto[len(before) :], messages[i]["content"], tok.eos_token)
        spans.append((len(before), end, before))
    return spans


def _truncate_left(ids: list[int], target: list[bool], turn_tokens: Sequence[tuple[int, int]], max_length: int) -> tuple[list[int], list[bool], int]:
    """(ids, target, target turns dropped) cut to the last ``max_length``
    tokens; a target turn that loses any token is no target any more."""
    dropped = 0
    if len(ids) > max_length:
        cut = len(ids) - max_length
        for first, last in turn_tokens:
            if first < cut and any(target[first:last]):
                dropped += 1
                for j in range(first, last):
                    target[j] = False
        ids, target = ids[cut:], target[cut:]
    return ids, target, dropped


def encode_conversation(tok, messages: Sequence[Message], n_prompt: int, history: int | None, max_length: int) -> tuple[list[Encoded], int]:
    """Segments of ``messages`` whose targets are the assistant turns at index
    >= ``n_prompt`` (``ipr_core.conversation.segments``), tokenised.

    Returns (segments that kept a target, target turns lost to truncation).
    Summing a side's segment log-probs gives log pi(side | prompt).
    """
    out, lost = [], 0
    for msgs, flags in segments(messages, n_prompt, history):
        e = encode_segment(tok, msgs, flags, max_length)
        if e is None:
            lost += sum(flags)
        else:
            out.append(e)
            lost += e.dropped_turns
    return out, lost


def collate(batch: Sequence[Encoded], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (IGNORE off target)."""
    import torch

    n = max(len(e) for e in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        row = torch.tensor(e.input_ids, dtype=torch.long)
        ids[i, : len(e)] = row
        mask[i, : len(e)] = 1
        labels[i, : len(e)] = row.masked_fill(~torch.tensor(e.target), IGNORE)
    return ids, mask, labels
