"""A tiny causal LM and tokenizer built locally: no hub, no download.

The tokenizer is a byte-level BPE trained with ``tokenizers`` on environment
text (so a 1k vocabulary covers the domain); the chat template is ChatML with
``{% generation %}`` markers, so ``return_assistant_tokens_mask`` works for
assistant-only losses. The model is a randomly initialised Qwen2 or Llama
config of ~1-5 M parameters, saved as a normal transformers folder
(safetensors), loadable by any HF tool.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterable

from ipr_core.config import TinyModelConfig

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


# transformers 5 builds models on the meta device and fills them in while
# loading; two threads loading at once (Prefect's thread-pool task runner runs
# shards side by side) can leave a model half on "meta" ("Cannot copy out of
# meta tensor", tied weights reported missing). Loading is cheap next to
# generation and training, so it is serialised with this process-wide lock.
_LOAD_LOCK = threading.Lock()


def load_causal_lm(path: str | Path, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` made safe to call from several threads."""
    from transformers import AutoModelForCausalLM

    with _LOAD_LOCK:
        return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


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
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
    )
    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if cfg.arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**common))
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out)
    return out


def save_tokenizer(tok, out: str | Path) -> None:
    """Save so that the tokenizer reloads as the same class.

    DESIGN.md gotcha: a tokenizer saved next to a Qwen2 config reloads through
    AutoTokenizer as a Qwen2 tokenizer that splits text differently, so the
    class is pinned in tokenizer_config.json and ``load_tokenizer`` honours it.
    """
    tok.save_pretrained(out)
    cfg_path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = tok.chat_template
    cfg["padding_side"] = "left"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load a tokenizer, keeping locally built ones as PreTrainedTokenizerFast."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_path = Path(path) / "tokenizer_config.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()).get("tokenizer_class") == "PreTrainedTokenizerFast":
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    else:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE
    return tok
