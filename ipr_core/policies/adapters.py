"""LoRA adapters that a base-model server applies per request
(``model.server.mode=lora``): each IPR iteration's checkpoint carries, beside
its merged weights, one adapter that is its whole difference from a fixed base.

With ``training.ipr.lora=true`` iteration k trains fresh LoRA factors on
iteration k-1's merged weights, so the policy after k iterations is

    W_k = W_base + sum_i s_i B_i A_i          (s_i = lora_alpha / r: LoRA's scaling)

(W_base: the policy iteration 1 started from, the SFT model). A sum of
low-rank products is one low-rank product of the stacked factors,
[s_1 B_1 | ... | s_k B_k] [A_1; ...; A_k], so iteration k's adapter is
iteration k-1's with the new factors appended: rank k r, scaling 1, exact up
to float rounding. A server holding W_base then serves every iteration as an
adapter of the one base (and the scorer, which is that base, with none).

A checkpoint folder with an adapter holds ``adapter/`` in peft's format
(adapter_config.json, adapter_model.safetensors: loadable with
``peft.PeftModel.from_pretrained`` and by vLLM's ``--enable-lora``) and
``adapter/ipr_base.json``: the base checkpoint's URI and content digest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    import torch

ADAPTER_DIR = "adapter"
BASE_FILE = "ipr_base.json"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Factors:
    """LoRA factors per module (peft's module path, e.g. ``base_model.model.model.layers.0.self_attn.q_proj``):
    (A [rank, in], B [out, rank]) with the scaling folded into B, so delta W = B @ A."""

    by_module: Mapping[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _ in self.by_module.values()), default=0)

    def then(self, later: Factors) -> Factors:
        """The factors of both deltas added: A stacked, B side by side (the module docstring's identity)."""
        import torch

        if set(later.by_module) != set(self.by_module):
            raise ValueError(f"LoRA adapters on different modules cannot be chained: {sorted(set(later.by_module) ^ set(self.by_module))[:4]}")
        return Factors({m: (torch.cat([a, later.by_module[m][0]], 0), torch.cat([b, later.by_module[m][1]], 1)) for m, (a, b) in self.by_module.items()})


def trained_factors(peft_model) -> Factors:
    """The LoRA factors of a peft model's active adapter, scaling folded in, on CPU in float32."""
    out = {}
    for name, mod in peft_model.named_modules():
        if not (hasattr(mod, "lora_A") and hasattr(mod, "scaling")) or not mod.lora_A:
            continue
        key = next(iter(mod.lora_A))
        a = mod.lora_A[key].weight.detach().float().cpu().clone()
        b = mod.lora_B[key].weight.detach().float().cpu() * float(mod.scaling[key])
        out[name] = (a, b)
    if not out:
        raise ValueError("the model has no LoRA layers to save as an adapter")
    return Factors(out)


def adapter_dir(checkpoint_dir: str | Path) -> Path | None:
    """The checkpoint's adapter folder, or None when it has none."""
    d = Path(checkpoint_dir) / ADAPTER_DIR
    return d if (d / WEIGHTS).is_file() else None


def read_factors(checkpoint_dir: str | Path) -> Factors | None:
    """The adapter's factors (scaling folded in), or None when the checkpoint has no adapter."""
    from safetensors.torch import load_file

    d = adapter_dir(checkpoint_dir)
    if d is None:
        return None
    scale = _scaling(json.loads((d / CONFIG).read_text()))
    w = load_file(str(d / WEIGHTS))
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in w})
    return Factors({m: (w[f"{m}.lora_A.weight"], w[f"{m}.lora_B.weight"] * scale) for m in mods})


def _scaling(cfg: Mapping) -> float:
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / r**0.5 if cfg.get("use_rslora") else alpha / r


def write_adapter(out_dir: str | Path, factors: Factors) -> Path:
    """``out_dir/adapter`` in peft's format: rank = the factors' rank, lora_alpha = rank
    (scaling 1: the scaling is in B). A module of smaller rank is zero-padded."""
    import torch
    from safetensors.torch import save_file

    d = Path(out_dir) / ADAPTER_DIR
    d.mkdir(parents=True, exist_ok=True)
    r = factors.rank
    tensors = {}
    for m, (a, b) in sorted(factors.by_module.items()):
        pad = r - a.shape[0]
        tensors[f"{m}.lora_A.weight"] = torch.cat([a, a.new_zeros(pad, a.shape[1])]).contiguous()
        tensors[f"{m}.lora_B.weight"] = torch.cat([b, b.new_zeros(b.shape[0], pad)], 1).contiguous()
    save_file(tensors, str(d / WEIGHTS))
    targets = sorted({m.rsplit(".", 1)[-1] for m in factors.by_module})
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none",
        "target_modules": targets, "fan_in_fan_out": False, "use_rslora": False, "modules_to_save": None, "base_model_name_or_path": None,
    }  # fmt: skip
    (d / CONFIG).write_text(json.dumps(cfg, indent=2))
    return d


def save_chained(peft_model, start_dir: str | Path, out_dir: str | Path) -> Path:
    """Write iteration k's adapter into ``out_dir``: the adapter of the checkpoint
    training started from (``start_dir``; none: it is the base) followed by the
    factors just trained."""
    new = trained_factors(peft_model)
    prev = read_factors(start_dir)
    return write_adapter(out_dir, new if prev is None else prev.then(new))


@dataclass(frozen=True)
class Base:
    """The checkpoint an adapter applies to."""

    uri: str
    digest: str


def read_base(checkpoint_dir: str | Path) -> Base | None:
    """The base of the checkpoint's adapter, or None when it has no adapter."""
    d = adapter_dir(checkpoint_dir)
    if d is None or not (d / BASE_FILE).is_file():
        return None
    b = json.loads((d / BASE_FILE).read_text())
    return Base(b["uri"], b["digest"])


def write_base(out_dir: str | Path, start_dir: str | Path, start: Base) -> None:
    """Record the adapter's base: the start checkpoint's own base when it has an
    adapter, else the start checkpoint itself (``start``: its URI and digest)."""
    base = read_base(start_dir) or start
    (Path(out_dir) / ADAPTER_DIR / BASE_FILE).write_text(json.dumps({"uri": base.uri, "digest": base.digest}, indent=2))
