"""A tiny causal LM and tokenizer built locally: no hub, no download.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on environment
text (so a 1k vocabulary covers the domain); the chat template is ChatML with
``{% generation %}`` markers, so ``return_assistant_tokens_mask`` works for
assistant-only losses. The model is a randomly initialised Qwen2 or Llama
config of ~1-5 M parameters, saved as a normal transformers folder
(safetensors), loadable by any HF tool (docs/models.md, "The tiny local model").

Saving and loading checkpoints lives in ``checkpoint_io``; its loaders are
re-exported here, where the backends and tests import them from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ipr_core.config import TinyModelConfig
from ipr_core.policies.checkpoint_io import load_causal_lm, load_tokenizer, save_checkpoint, save_tokenizer

__all__ = ["CHAT_TEMPLATE", "IM_END", "IM_START", "PAD", "build_tiny_model", "load_causal_lm", "load_tokenizer", "save_tokenizer", "train_tokenizer"]

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# ChatML; assistant content and its closing tag are the generation (target) span.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on ``corpus``, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=PAD, bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"  # generation pads on the left
    return fast


def build_tiny_model(cfg: TinyModelConfig, corpus: Iterable[str], out_dir: str | Path, seed: int = 0) -> Path:
    """Train a tokenizer on ``corpus``, initialise a tiny model, save both to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(corpus, cfg.vocab_size)
    common = dict(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_embeddings,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
    )
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if cfg.arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return save_checkpoint(model, tok, out)
