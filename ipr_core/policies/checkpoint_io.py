"""Checkpoint folders: a transformers model (safetensors) and its tokenizer,
saved and loaded so that both reload as what was saved.

Every checkpoint the project writes (the tiny base model, SFT, each IPR
iteration) goes through ``save_checkpoint``, and every reader through
``load_causal_lm`` and ``load_tokenizer``. The tokenizer reload gotcha
(docs/models.md, "The tokenizer reload gotcha") is handled here:
``save_tokenizer`` pins the tokenizer class and ``load_tokenizer`` honours it.

torch and transformers are imported inside the functions, so importing this
module (and ``ipr_core.policies.tiny``, which re-exports it) stays cheap.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

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


def save_tokenizer(tok, out: str | Path) -> None:
    """Save so that the tokenizer reloads as the same class.

    The gotcha (docs/models.md): a tokenizer saved next to a Qwen2 config
    reloads through AutoTokenizer as a Qwen2 tokenizer that splits text
    differently, so the class is pinned in tokenizer_config.json and
    ``load_tokenizer`` honours it.
    """
    tok.save_pretrained(out)
    cfg_path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = tok.chat_template
    cfg["padding_side"] = "left"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """Load a tokenizer, keeping locally built ones as PreTrainedTokenizerFast;
    one without a chat template gets the tiny model's ChatML template."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from ipr_core.policies.tiny import CHAT_TEMPLATE  # here: tiny imports this module

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


def save_checkpoint(model, tok, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Save model (safetensors) + tokenizer so that both reload identically.

    LoRA adapters are merged first so checkpoints stay plain transformers
    folders; weights go back to the checkpoint's own dtype (``dtype``; None
    or float32 keeps them as they are)."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if dtype is not None and dtype != torch.float32:
        model = model.to(dtype)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out)
    return out


def checkpoint_dtype(path: str | Path) -> torch.dtype | None:
    """The dtype a checkpoint was saved in (so training in fp32 does not double it)."""
    import torch
    from transformers import AutoConfig

    d = getattr(AutoConfig.from_pretrained(str(path)), "dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) else None
