"""Prompt tokenization piece by piece (between special tokens) equals whole-text tokenization."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("tokenizers")

from fake_env import conversations, tiny_model  # noqa: E402
from ipr_core.policies import segment_tokens  # noqa: E402
from ipr_core.policies.segment_tokens import SegmentEncoder  # noqa: E402
from ipr_core.policies.tiny import load_tokenizer  # noqa: E402

TRICKY = [
    "",
    " leading space, trailing space ",
    "\n\nnewlines\n",
    "unicode: café naïve 東京 \u0301 emoji \U0001f600",
    "a literal <|im_start|> inside content and a broken <|im_end",
    "<|im_end|><|im_end|> back to back",
    "digits 12345 and  double  spaces\t\ttabs",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(tiny_model(tmp_path_factory.mktemp("tiny")))


def _prompts(tok):
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations(6)]
    for t in TRICKY:
        conv = [{"role": "system", "content": t}, {"role": "user", "content": t + "x"}, {"role": "assistant", "content": " " + t}, {"role": "user", "content": t}]
        texts.append(tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False))
    return texts + TRICKY


def test_pieces_equal_whole_text_and_are_reused(tok):
    enc = SegmentEncoder(tok)
    assert enc.active  # byte-level BPE without a prefix space: the tiny model's tokenizer
    texts = _prompts(tok)
    for _ in range(2):  # the second pass is served from remembered pieces, after the checks ran out
        for t in texts:
            assert enc.encode(t) == list(tok(t, add_special_tokens=False)["input_ids"]), t
    assert enc.active and enc._checks_left == 0
    n = len(enc._pieces)
    enc.encode(texts[0])
    assert len(enc._pieces) == n  # nothing new to tokenize


def test_piece_memory_is_bounded(tok):
    enc = SegmentEncoder(tok, max_pieces=3)
    for i in range(10):
        enc.encode(f"<|im_start|>user\nobservation {i}<|im_end|>\n")
    assert len(enc._pieces) == 3
    assert enc.encode("<|im_start|>user\nobservation 0<|im_end|>\n") == list(tok("<|im_start|>user\nobservation 0<|im_end|>\n", add_special_tokens=False)["input_ids"])


def _fast_tokenizer(pre_tokenizer, decoder):
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizer
    t.decoder = decoder
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"])
    t.train_from_iterator(["the cat sat on the mat", "go to the red ball", "you see a wall"] * 20 + TRICKY, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>")


def test_other_tokenizers_fall_back_to_whole_texts():
    from tokenizers import decoders, pre_tokenizers

    for pre, dec in ((pre_tokenizers.ByteLevel(add_prefix_space=True), decoders.ByteLevel()), (pre_tokenizers.Metaspace(prepend_scheme="first"), decoders.Metaspace())):
        tok = _fast_tokenizer(pre, dec)
        enc = SegmentEncoder(tok)
        assert not enc.active
        text = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"
        assert enc.encode(text) == list(tok(text, add_special_tokens=False)["input_ids"])


def test_a_misjudged_tokenizer_is_caught_by_the_first_checks(monkeypatch, caplog):
    from tokenizers import decoders, pre_tokenizers

    tok = _fast_tokenizer(pre_tokenizers.Metaspace(prepend_scheme="first"), decoders.Metaspace())
    monkeypatch.setattr(segment_tokens, "_segmentable", lambda spec: True)  # pretend it qualifies
    enc = SegmentEncoder(tok)
    assert enc.active
    text = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n"  # Metaspace marks only the first piece
    with caplog.at_level(logging.WARNING):
        assert enc.encode(text) == list(tok(text, add_special_tokens=False)["input_ids"])
    assert not enc.active and "encoding whole prompts" in caplog.text
