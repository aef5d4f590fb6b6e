"""IPR trainer vs TRL's DPOTrainer: tokens/s and peak memory on the same pairs;
and the IPR trainer with training.activation_checkpointing against without it.

    .venv/bin/python bench/training.py [--pairs 256] [--batch-size 8] [--epochs 2] [--repeats 2]

Measured in one run, same single-turn pairs (prompt = the windowed context of
an expert step, chosen = the expert's step, rejected = another action), same
tiny model (default TinyModelConfig, ~1 M parameters), same batch size,
epochs and learning rate, reference log-probs precomputed by both, sigmoid
DPO, no SFT term. Each trainer runs in its own fresh process, alternating,
``--repeats`` times; the best run of each is reported (the machine is shared).

- tokens/s: non-padding tokens forwarded through the policy in the training
  loop / the loop's wall time (TRL: ``train_runtime``; ours: ``train_s``).
  TRL's sequences are one token longer per side (it scores the newline the
  chat template puts after <|im_end|>), so it is credited with those tokens.
- end-to-end: the whole call (tokenisation, reference pass, training, save).
- peak memory: CPU - the rise of the process's peak RSS (VmHWM, reset before
  the call where the kernel allows) over its RSS before the call; CUDA -
  torch.cuda.max_memory_allocated.
TRL on CPU: bf16=False, gradient_checkpointing=False, use_cpu=True,
report_to=[], precompute_ref_log_probs=True (docs/models.md: its defaults break on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


# --- data ------------------------------------------------------------------------------


def pick_env(name: str):
    import importlib.util

    if name in ("auto", "babyai") and importlib.util.find_spec("ipr_core.envs.babyai") and importlib.util.find_spec("minigrid"):
        from ipr_core.envs.base import make_env

        return "babyai", partial(make_env, "babyai", None, 20)
    from fake_env import LineWorld

    return "lineworld", LineWorld


def build(args, tmp: Path) -> tuple[str, Path, Path]:
    """A tiny model with a tokenizer trained on the environment's text, and
    single-turn pairs at every expert step (written as JSON)."""
    from ipr_cli.model import tokenizer_corpus
    from ipr_core.config import TinyModelConfig
    from ipr_core.conversation import render_context
    from ipr_core.experts import collect_experts
    from ipr_core.policies.tiny import build_tiny_model

    env_name, make = pick_env(args.env)
    env = make()
    tasks = env.list_tasks("train", n=args.tasks, seed=0)
    experts = [t for t in collect_experts(env, tasks) if t.error is None]
    model = build_tiny_model(TinyModelConfig(), tokenizer_corpus(env, tasks[:64]), tmp / "model")
    env.close()
    actions = sorted({s.action for e in experts for s in e.steps})
    pairs = []
    for e in experts:
        for j, s in enumerate(e.steps):
            other = actions[(actions.index(s.action) + 1 + j % max(1, len(actions) - 1)) % len(actions)]  # != s.action
            pairs.append(
                {
                    "prompt": render_context(e.system, e.instruction, e.steps[:j], args.history),
                    "chosen": [{"role": "assistant", "content": s.assistant_text()}],
                    "rejected": [{"role": "assistant", "content": f"Thought: {s.thought}\nAction: {other}"}],
                    "kind": "step",
                    "pair_id": f"{e.traj_id}-{j}",
                }
            )
    pairs = pairs[: args.pairs]
    path = tmp / "pairs.json"
    path.write_text(json.dumps(pairs))
    return env_name, model, path


# --- one measured run per process ----------------------------------------------------


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _mem_start() -> int:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:  # reset VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss_kb("VmRSS") * 1024


def _mem_peak(start: int) -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() - start
    return _rss_kb("VmHWM") * 1024 - start


def run_ipr(args, model: Path, pairs: list, out: Path) -> dict:
    from ipr_core.config import IPRTrainConfig
    from ipr_core.training.ipr_trainer import train_ipr

    cfg = IPRTrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, warmup_ratio=0.1, w_sft=0.0, max_length=1024)
    mem0 = _mem_start()
    t0 = time.perf_counter()
    ckpt = args.worker == "ipr-ckpt"  # each decoder layer recomputed in the backward pass
    r = train_ipr(model, model, pairs, [], cfg, None, out, seed=0, precision=args.precision, activation_checkpointing=ckpt)
    return {"end_to_end_s": time.perf_counter() - t0, "train_s": r.train_s, "tokens": r.tokens, "steps": r.steps, "peak_mem": _mem_peak(mem0), "mean_loss": sum(r.losses) / len(r.losses)}


def run_trl(args, model: Path, pairs: list, out: Path) -> dict:
    import torch
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from ipr_core.policies.tiny import load_tokenizer
    from ipr_core.training.common import load_model

    transformers.logging.set_verbosity_error()
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported() and args.precision != "fp32"
    config = DPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs, learning_rate=args.lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=0.1, beta=0.1, max_length=1024, precompute_ref_log_probs=True,
        bf16=bf16, gradient_checkpointing=False, use_cpu=not cuda, report_to=[], save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    mem0 = _mem_start()
    t0 = time.perf_counter()
    tok = load_tokenizer(model)
    policy = load_model(model, torch.device("cuda" if cuda else "cpu"))  # fp32, dropout off: as ours
    trainer = DPOTrainer(model=policy, args=config, train_dataset=dataset, processing_class=tok)
    res = trainer.train()
    trainer.save_model(str(out))
    wall = time.perf_counter() - t0
    ds = trainer.train_dataset
    per_epoch = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]))
    return {"end_to_end_s": wall, "train_s": res.metrics["train_runtime"], "tokens": int(per_epoch * args.epochs), "steps": res.global_step, "peak_mem": _mem_peak(mem0), "mean_loss": res.training_loss}


def worker(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    pairs = json.loads(Path(args.pairs_file).read_text())
    # Same imports and a model load in both workers before measuring, so that
    # neither run is charged for modules the other had already imported.
    import datasets  # noqa: F401
    import trl  # noqa: F401
    from transformers import AutoModelForCausalLM

    import ipr_core.training.ipr_trainer  # noqa: F401

    AutoModelForCausalLM.from_pretrained(args.model)  # imports the model class; discarded
    with tempfile.TemporaryDirectory() as tmp:
        fn = run_trl if args.worker == "trl" else run_ipr
        res = fn(args, Path(args.model), pairs, Path(tmp) / "out")
    print("RESULT " + json.dumps(res))
    return 0


# --- driver ----------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="auto", choices=["auto", "babyai", "lineworld"])
    ap.add_argument("--tasks", type=int, default=96, help="expert episodes the pairs come from")
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--history", type=int, default=2, help="past steps in each prompt")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (this machine: 2 shared cores)")
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--worker", choices=["ipr", "ipr-ckpt", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--pairs-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as tmp:
        env_name, model, pairs_file = build(args, Path(tmp))
        n_pairs = len(json.loads(pairs_file.read_text()))
        import torch
        from transformers import AutoModelForCausalLM

        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"
        print(f"env={env_name}  model {n_params / 1e6:.2f} M params  {n_pairs} single-turn pairs  batch {args.batch_size}  epochs {args.epochs}  {device}")
        runs: dict[str, list[dict]] = {"trl": [], "ipr": [], "ipr-ckpt": []}
        for _ in range(args.repeats):
            for which in runs:
                cmd = [sys.executable, __file__, "--worker", which, "--model", str(model), "--pairs-file", str(pairs_file)]
                cmd += ["--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--lr", str(args.lr), "--threads", str(args.threads), "--precision", args.precision]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if proc.returncode or line is None:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{which} run failed (exit {proc.returncode})")
                runs[which].append(json.loads(line[len("RESULT ") :]))
    mem_kind = "CUDA max allocated" if torch.cuda.is_available() else "peak RSS rise"
    print(f"\n{'trainer':<22}{'tokens/s':>10}{'train s':>9}{'end-to-end s':>14}{'steps':>7}{'tokens':>9}{mem_kind + ' MiB':>24}{'mean loss':>11}")
    best = {}
    for which, label in (("trl", "TRL DPOTrainer"), ("ipr", "IPR trainer (ours)"), ("ipr-ckpt", "ours + layer ckpt")):
        b = max(runs[which], key=lambda r: r["tokens"] / r["train_s"])
        best[which] = b
        print(f"{label:<22}{b['tokens'] / b['train_s']:>10.0f}{b['train_s']:>9.2f}{b['end_to_end_s']:>14.2f}{b['steps']:>7}{b['tokens']:>9}{b['peak_mem'] / 2**20:>24.1f}{b['mean_loss']:>11.4f}")
    tps = {k: v["tokens"] / v["train_s"] for k, v in best.items()}
    print(f"\ntokens/s ratio (ours / TRL): {tps['ipr'] / tps['trl']:.2f}x   end-to-end time ratio (TRL / ours): {best['trl']['end_to_end_s'] / best['ipr']['end_to_end_s']:.2f}x   "
          f"peak memory ratio (ours / TRL): {best['ipr']['peak_mem'] / max(best['trl']['peak_mem'], 1):.2f}")
    print(f"layer checkpointing (ours): tokens/s {tps['ipr-ckpt'] / tps['ipr']:.2f}x, peak memory {best['ipr-ckpt']['peak_mem'] / max(best['ipr']['peak_mem'], 1):.2f}x, "
          f"same mean loss: {best['ipr-ckpt']['mean_loss'] == best['ipr']['mean_loss']}")
    print("all runs (tokens/s): " + "  ".join(f"{k}: " + ", ".join(f"{r['tokens'] / r['train_s']:.0f}" for r in v) for k, v in runs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
