"""Prompt tokenization that remembers the pieces between special tokens.

Why: every turn of every episode re-tokenizes its whole prompt (system
prompt, task, the history window, the new observation), though all but the
newest message were tokenized on earlier turns. In the lock-step runner that
cost as much as stepping the environments (measured with bench/rollouts.py;
figures in docs/performance.md).

A fast (``tokenizers``) tokenizer first splits the text at its added tokens
(``<|im_start|>``, ``<|im_end|>``...) and then normalizes, pre-tokenizes and
encodes each piece on its own. So encoding the pieces one by one, each
remembered, gives the same ids, provided nothing reaches across a split:
added tokens without lstrip/rstrip/single_word, and a pre-tokenizer that
does not treat the first piece specially (byte-level BPE without
add_prefix_space: GPT-2, Qwen2, SmolLM2, the tiny model). Other tokenizers,
and any mismatch on the first prompts (each checked against a whole-text
encode), fall back to encoding the whole text.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict

log = logging.getLogger(__name__)

MAX_PIECES = 1 << 14  # remembered pieces (LRU); BabyAI runs use a few thousand
CHECKED_PROMPTS = 8  # first prompts also encoded whole, to catch a tokenizer this misjudges


def _segmentable(spec: dict) -> bool:
    """Whether the tokenizer's pipeline keeps pieces between added tokens independent."""
    for tok in spec.get("added_tokens") or []:
        if tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word"):
            return False
    norm = spec.get("normalizer")
    norms = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    if any(n.get("type") not in ("NFC", "NFKC", "NFD", "NFKD", "Lowercase") for n in norms):
        return False
    pre = spec.get("pre_tokenizer")
    if not pre:
        return False
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for p in pres:
        kind = p.get("type")
        if kind == "ByteLevel" and p.get("add_prefix_space"):
            return False
        if kind not in ("ByteLevel", "Split", "Digits", "Punctuation", "Whitespace", "WhitespaceSplit"):
            return False
    return any(p.get("type") == "ByteLevel" for p in pres)


class SegmentEncoder:
    """``encode(text)`` -> ids, equal to ``tokenizer(text, add_special_tokens=False)``."""

    def __init__(self, tokenizer, max_pieces: int = MAX_PIECES):
        self.tokenizer = tokenizer
        self.max_pieces = max_pieces
        self._pieces: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._checks_left = CHECKED_PROMPTS
        self._split = None
        self._added: dict[str, int] = {}
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is None:  # a slow (Python) tokenizer: no such guarantee
            return
        try:
            spec = json.loads(backend.to_str())
        except Exception:  # noqa: BLE001 - an unusual backend: encode whole texts
            return
        if not _segmentable(spec):
            return
        self._added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens") or []}
        if self._added:
            # Longest first, as the tokenizer's own added-token matcher prefers.
            alts = "|".join(re.escape(c) for c in sorted(self._added, key=len, reverse=True))
            self._split = re.compile(f"({alts})")

    @property
    def active(self) -> bool:
        return self._split is not None

    def _whole(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _piece(self, text: str) -> tuple[int, ...]:
        ids = self._pieces.get(text)
        if ids is None:
            ids = tuple(self._whole(text))
            self._pieces[text] = ids
            if len(self._pieces) > self.max_pieces:
                self._pieces.popitem(last=False)
        else:
            self._pieces.move_to_end(text)
        return ids

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self._whole(text)
        ids: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:  # the captured separators: added tokens
                ids.append(self._added[part])
            elif part:
                ids.extend(self._piece(part))
        if self._checks_left:
            self._checks_left -= 1
            whole = self._whole(text)
            if whole != ids:
                log.warning("tokenizer %s does not encode pieces between special tokens independently; encoding whole prompts", type(self.tokenizer).__name__)
                self._split = None
                self._pieces.clear()
                return whole
        return ids
