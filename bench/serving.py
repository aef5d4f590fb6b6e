"""Generation through a managed vLLM server vs the in-process transformers backend.

    .venv/bin/python bench/serving.py [--tasks 32] [--rollouts 4] [--model DIR] [--threads 1]

Measured in one run, on one checkpoint (kept in a local store, so that
``serving.connect`` serves it under its content digest, as a stage would) and
the same BabyAI-GoToObj-v0 tasks:
1. in-process (``model.backend=transformers``): episodes/s and generated
   tokens/s of the lock-step runner (``ipr.run_specs``, as ``_episodes`` in the
   pipeline's stages), on greedy eval episodes and, with ``--rollouts N``, on
   sampled MC rollouts from expert states (N per state, temperature 1);
2. a managed vLLM server (``model.backend=openai``, ``model.server.mode=managed``,
   vLLM's CPU build in its own venv): its start time (the identity's
   ``start_s``) and the same episodes; greedy outcomes compared task by task
   with the in-process run (sampled ones cannot be: the RNGs differ). The two
   backends alternate ``--repeat`` times and each is taken at its fastest (a
   shared machine's speed drifts); both start every run cold (the in-process
   prefix cache emptied, the server's prefix cache reset);
3. weight swap (``model.server.mode=reload``): one server started on
   checkpoint 1, then given checkpoint 2 (same config, other weights) in place;
   the reload and prefix-cache reset times against a fresh start, and whether
   the reloaded server's greedy replies are checkpoint 2's;
4. adapters (``model.server.mode=lora``): one LoRA-enabled server started on
   checkpoint 1; a checkpoint that carries a rank-``--lora-rank`` adapter on it
   (as an IPR iteration trained with ``training.ipr.lora`` does) is loaded at run
   time; the adapter's load time, whether its greedy first replies are the
   merged checkpoint's in process, and the greedy episodes through the base
   and through the adapter on that one server.

The tiny model is the vLLM test's config (tests/test_vllm_server.py: vLLM's
CPU attention needs head_dim >= 32, reload needs an untied output layer),
fine-tuned for ``--sft-epochs`` on expert episodes so that replies are
well-formed and episodes end at different turns. Its 320-token vocabulary
makes prompts long, hence ``--history 1`` within the server's
``--max-model-len 512``: past it vLLM shortens a reply to fit while the
in-process model generates on, so the backends' greedy replies part (an
untrained model's garbage replies get there, ``--sft-epochs 0``).

Every server is stopped at the end and the bench checks that no
``vllm.entrypoints`` process is left. Measured results: docs/performance.md,
"Generation through a vLLM server".
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from ipr_core import ipr, store  # noqa: E402
from ipr_core.config import ModelConfig, SamplingConfig, TinyModelConfig  # noqa: E402
from ipr_core.envs.base import make_env  # noqa: E402
from ipr_core.pipeline.runner import publish  # noqa: E402
from ipr_core.pipeline.stage import Folder  # noqa: E402
from ipr_core.policies.base import SamplingParams  # noqa: E402

VLLM_PY = os.environ.get("IPR_VLLM_PYTHON") or str(ROOT / ".vllm-venv" / "bin" / "python")
LEVEL = {"level": "BabyAI-GoToObj-v0"}
# The test's server flags: a fixed, small KV cache (a fraction of RAM would be GBs), float32 like the in-process model.
SERVER_ARGS = ["--kv-cache-memory-bytes", str(256 * 2**20), "--no-enable-chunked-prefill", "--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]
TINY = TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128, vocab_size=320, max_position_embeddings=512, tie_embeddings=False)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=32, help="greedy eval episodes (one per test task)")
    ap.add_argument("--rollouts", type=int, default=4, help="sampled rollouts per expert state (temperature 1); 0: greedy only")
    ap.add_argument("--mc-states", type=int, default=8, help="expert states (of the eval tasks' expert episodes) the rollouts start from")
    ap.add_argument("--model", default=None, help="an existing checkpoint folder instead of the tiny model (untied embeddings for the reload part)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process backend")
    ap.add_argument("--concurrency", type=int, default=32, help="episodes in flight (the generate batch, and the HTTP requests in flight)")
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=40, help="expert replies are ~25-33 tokens with this vocabulary")
    ap.add_argument("--history", type=int, default=1, help="past steps in the prompt (sampling.history_turns)")
    ap.add_argument("--sft-epochs", type=float, default=2.0, help="fine-tuning of the tiny model before measuring (0: untrained)")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each backend; each is taken at its fastest")
    ap.add_argument("--lora-rank", type=int, default=16, help="rank of the adapter of part 4")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


# --- checkpoints ---------------------------------------------------------------------


def tiny_checkpoint(env, out: Path, sft_epochs: float, history: int) -> Path:
    """The tiny model, fine-tuned on expert episodes of the train split (an
    untrained one repeats one malformed reply: no realistic episodes to time)."""
    from ipr_cli.model import tokenizer_corpus
    from ipr_core.config import SFTConfig
    from ipr_core.experts import collect_experts
    from ipr_core.policies.tiny import build_tiny_model
    from ipr_core.training.sft import train_sft

    path = build_tiny_model(TINY, tokenizer_corpus(env, env.list_tasks("train", n=32, seed=0)), out / "base")
    if sft_epochs <= 0:
        return path
    demos = [t for t in collect_experts(env, env.list_tasks("train", n=200, seed=1)) if t.error is None and t.success]
    train_sft(path, demos, SFTConfig(epochs=sft_epochs, lr=2e-3, batch_size=16, warmup_ratio=0.02), history, out / "sft", precision="auto")
    return out / "sft"


def other_weights(src: Path, out: Path, seed: int) -> Path:
    """``src``'s config and tokenizer with freshly initialised weights: what a
    reload swaps in must fit the server's architecture and tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for f in src.iterdir():  # tokenizer, chat template, generation config
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, out / f.name)
    return out


def with_adapter(src: Path, base_uri: str, out: Path, rank: int, seed: int) -> Path:
    """``src`` plus a LoRA adapter of rank ``rank`` with random factors (B too, so it
    changes the replies), saved as an IPR iteration trained with LoRA is: merged
    weights and ``adapter/`` on the base ``base_uri``."""
    import torch

    from ipr_core.policies.adapters import Base, save_chained, write_base
    from ipr_core.policies.checkpoint_io import load_causal_lm, load_tokenizer, save_checkpoint
    from ipr_core.training.common import add_lora

    torch.manual_seed(seed)
    model = add_lora(load_causal_lm(src), rank)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    save_chained(model, src, out)
    save_checkpoint(model, load_tokenizer(src), out)
    write_base(out, src, Base(base_uri, store.digest(base_uri)))
    return out


def to_store(root: Path, name: str, path: Path) -> str:
    """Write ``path`` into the local store: ``connect`` serves a checkpoint by its manifest's digest."""
    uri = store.join(str(root), name)
    publish(uri, "checkpoint", Folder(path))
    return uri


# --- backends ------------------------------------------------------------------------


def model_cfg(backend: str, mode: str = "managed", concurrency: int = 32) -> ModelConfig:
    # VLLM_SERVER_DEV_MODE on the managed server too: its /reset_prefix_cache lets
    # every timed run start cold, as the in-process one does.
    server = {"mode": mode, "python": VLLM_PY, "max_servers": 1, "args": SERVER_ARGS, "start_timeout_s": 600, "env": {"VLLM_SERVER_DEV_MODE": "1"}}
    # As many requests in flight as episodes: the server batches a whole turn, as the in-process backend does.
    openai = {"timeout_s": 300, "max_retries": 1, "max_concurrency": concurrency}
    return ModelConfig(backend=backend, device="cpu", dtype="float32", server=server, openai=openai)


def served_policy(cfg: ModelConfig, sampling_cfg: SamplingConfig, uri: str):
    """The policy on ``uri``'s server (started or reloaded by ``connect``), its identity, its release."""
    from ipr_core.policies.factory import make_policy
    from ipr_core.policies.serving import connect

    served, release = connect(cfg, uri)
    return make_policy(cfg, sampling_cfg, uri, served), served, release


def cold(policy, served=None) -> None:
    """Counters zeroed and no KV kept from an earlier run, on either backend."""
    import httpx

    if served is None:
        policy.reset_stats()
        policy.clear_prefix_cache()
        return
    from ipr_core.policies.openai_http import HTTPStats

    policy.stats = HTTPStats()
    httpx.post(served.base_url[: -len("/v1")] + "/reset_prefix_cache", timeout=60).raise_for_status()


def group_cpu_s(pgid: int) -> float:
    """CPU seconds used so far by the live processes of group ``pgid`` (the
    server and its engine process): what the server took of the 2 cores."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def play(make, policy, specs, sampling: SamplingParams, args, served=None) -> dict:
    """One timed, cold run of ``specs``: trajectories, wall s, generated tokens, server CPU s."""
    cold(policy, served)
    cpu0 = group_cpu_s(served.identity["pid"]) if served else 0.0
    t0 = time.perf_counter()
    eps = ipr.run_specs(make, policy, specs, sampling, history=args.history, batch_size=args.concurrency, concurrency=args.concurrency)
    wall = time.perf_counter() - t0
    cpu = group_cpu_s(served.identity["pid"]) - cpu0 if served else None
    return {"eps": eps, "wall": wall, "tokens": int(policy.stats.generated_tokens), "server_cpu": cpu}


def warm_up(policy) -> None:
    policy.generate([[{"role": "user", "content": "warm up"}]], SamplingParams(temperature=0.0, max_new_tokens=4), [0])  # first-call overheads out of the timings


# --- comparisons ---------------------------------------------------------------------


def agreement(a, b) -> dict[str, int]:
    """Per task: equal outcome_reward, n_steps, action sequence, whole replies (thought and action)."""
    pairs = list(zip(a, b))
    return {
        "outcome_reward": sum(x.outcome_reward == y.outcome_reward for x, y in pairs),
        "n_steps": sum(len(x.steps) == len(y.steps) for x, y in pairs),
        "actions": sum([s.action for s in x.steps] == [s.action for s in y.steps] for x, y in pairs),
        "replies": sum([(s.thought, s.action) for s in x.steps] == [(s.thought, s.action) for s in y.steps] for x, y in pairs),
    }


def first_divergence(a, b) -> str:
    """Where the first differing episode first differs (turn, the two replies): to see why."""
    for x, y in zip(a, b):
        for t, (s, u) in enumerate(zip(x.steps, y.steps)):
            if (s.thought, s.action) != (u.thought, u.action):
                return f"{x.task.task_id} turn {t}: in-process {s.thought!r} / {s.action!r} vs server {u.thought!r} / {u.action!r}"
        if len(x.steps) != len(y.steps):
            return f"{x.task.task_id}: {len(x.steps)} vs {len(y.steps)} steps with equal replies (the environment's ending?)"
    return "none"


# --- the parts -----------------------------------------------------------------------


def episode_sets(make, args) -> dict[str, tuple[list, SamplingParams]]:
    """Greedy eval episodes on the test tasks; sampled MC rollouts from their expert states."""
    from ipr_core.experts import collect_experts

    env = make()
    tasks = env.list_tasks("test", n=args.tasks, seed=args.seed)
    experts = [t for t in collect_experts(env, tasks) if t.error is None and t.success]
    env.close()
    sets = {"greedy": (ipr.eval_specs(tasks, args.seed, "bench"), SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens))}
    if args.rollouts > 0:
        targets = [tg for tg in ipr.expert_targets(experts) if not ipr.is_last_step(tg)][: args.mc_states]
        sets["sampled"] = (ipr.mc_specs(targets, args.rollouts, args.seed), SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens))
    return sets


def throughput(make, path: Path, uri: str, sets, sampling_cfg: SamplingConfig, args) -> tuple[dict, dict]:
    """Each episode set on both backends, alternating ``--repeat`` times; every run, and the server's identity."""
    from ipr_core.policies.factory import make_policy

    local = make_policy(model_cfg("transformers"), sampling_cfg, str(path))
    remote, served, release = served_policy(model_cfg("openai", concurrency=args.concurrency), sampling_cfg, uri)
    runs: dict = {}
    try:
        warm_up(local)
        warm_up(remote)
        for _ in range(args.repeat):  # alternating: a slow spell of the shared machine hits both
            for name, (specs, sampling) in sets.items():
                runs.setdefault(("in-process", name), []).append(play(make, local, specs, sampling, args))
                runs.setdefault(("vllm managed", name), []).append(play(make, remote, specs, sampling, args, served))
    finally:
        remote.close()
        release()
        local.close()
    return runs, served.identity


def weight_swap(make, uri1: str, uri2: str, path2: Path, sampling_cfg: SamplingConfig, args) -> dict:
    """Reload mode: a server started on checkpoint 1, then given checkpoint 2;
    its timings, and its greedy first replies against checkpoint 2 in process."""
    from ipr_core.policies.factory import make_policy

    cfg = model_cfg("openai", "reload", args.concurrency)
    first, served1, release = served_policy(cfg, sampling_cfg, uri1)
    first.close()
    release()  # idle: the next checkpoint reloads it rather than starting another
    second, served2, release = served_policy(cfg, sampling_cfg, uri2)
    local = make_policy(model_cfg("transformers"), sampling_cfg, str(path2))
    try:
        specs, greedy = episode_sets(make, args)["greedy"]
        prompts = first_turn_prompts(make, specs)
        same = sum(a == b for a, b in zip(second.generate(prompts, greedy, [0] * len(prompts)), local.generate(prompts, greedy, [0] * len(prompts))))
    finally:
        second.close()
        release()
        local.close()
    return {"started": served1.identity, "swapped": served2.identity, "same_first_replies": (same, len(prompts))}


def adapter_serving(make, uri1: str, uri3: str, path3: Path, sets, sampling_cfg: SamplingConfig, args) -> dict:
    """Lora mode: the base's server, the adapter loaded on it; greedy first replies
    through the adapter vs the merged checkpoint in process; greedy episodes through each."""
    from ipr_core.policies.factory import make_policy

    cfg = model_cfg("openai", "lora", args.concurrency)
    specs, greedy = sets["greedy"]
    base, served_base, release_base = served_policy(cfg, sampling_cfg, uri1)
    adapter, served_adapter, release = served_policy(cfg, sampling_cfg, uri3)
    local = make_policy(model_cfg("transformers"), sampling_cfg, str(path3))
    try:
        warm_up(base), warm_up(adapter)
        prompts = first_turn_prompts(make, specs)
        replies = adapter.generate(prompts, greedy, [0] * len(prompts))
        same = sum(a == b for a, b in zip(replies, local.generate(prompts, greedy, [0] * len(prompts))))
        as_base = sum(a == b for a, b in zip(replies, base.generate(prompts, greedy, [0] * len(prompts))))
        runs = {"base": [], "adapter": []}
        for _ in range(args.repeat):
            runs["base"].append(play(make, base, specs, greedy, args, served_base))
            runs["adapter"].append(play(make, adapter, specs, greedy, args, served_adapter))
    finally:
        base.close(), adapter.close(), local.close()
        release(), release_base()
    return {"base": served_base.identity, "adapter": served_adapter.identity, "same_as_merged": (same, len(prompts)), "same_as_base": as_base, "runs": runs}


def first_turn_prompts(make, specs) -> list:
    from ipr_core.conversation import render_context

    env = make()
    try:
        out = []
        for s in specs:
            instruction = env.reset(s.task)
            out.append(render_context(env.system_prompt(), instruction, (), 0))
        return out
    finally:
        env.close()


def stop_servers() -> list[int]:
    """Stop every server this process started; the vllm.entrypoints pids still alive (should be none)."""
    from ipr_core.policies.serving import ServerPool, spec_of
    from ipr_core.resources import process_wide

    for mode in ("managed", "reload", "lora"):
        spec = spec_of(model_cfg("openai", mode).server)
        process_wide(("model-servers", spec), lambda: ServerPool(spec)).stop_all()
    out = subprocess.run(["pgrep", "-f", "vllm.entrypoints"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


# --- printing ------------------------------------------------------------------------


def print_runs(runs: dict, sets) -> None:
    best = {k: min(rs, key=lambda r: r["wall"]) for k, rs in runs.items()}
    print(f"\n{'backend':<14}{'episodes':<9}{'n':>4}{'wall s':>8}{'ep/s':>8}{'gen tok':>9}{'tok/s':>8}{'ep/s vs in-process':>20}{'server CPU s':>14}  wall s of every run")
    for (backend, name), r in best.items():
        ref = best[("in-process", name)]["wall"]
        n = len(sets[name][0])
        cpu = f"{r['server_cpu']:.1f}" if r["server_cpu"] is not None else "-"
        every = " ".join(f"{x['wall']:.2f}" for x in runs[(backend, name)])
        print(f"{backend:<14}{name:<9}{n:>4}{r['wall']:>8.2f}{n / r['wall']:>8.2f}{r['tokens']:>9}{r['tokens'] / r['wall']:>8.0f}{ref / r['wall']:>19.2f}x{cpu:>14}  {every}")


def print_greedy(runs: dict) -> None:
    local, remote = runs[("in-process", "greedy")], runs[("vllm managed", "greedy")]
    a, b = local[0]["eps"], remote[0]["eps"]
    agree = agreement(a, b)
    stable = all(agreement(r["eps"], a)["replies"] == len(a) for r in local) and all(agreement(r["eps"], b)["replies"] == len(b) for r in remote)
    print(f"\ngreedy agreement, in-process vs server, of {len(a)} tasks: " + ", ".join(f"{k} {v}/{len(a)}" for k, v in agree.items()))
    print(f"success: in-process {sum(e.success for e in a)}/{len(a)}, server {sum(e.success for e in b)}/{len(b)}; "
          f"errors: {sum(e.error is not None for e in a)}, {sum(e.error is not None for e in b)}; each backend equal to itself across repeats: {stable}")
    print(f"first divergence: {first_divergence(a, b)}")


def print_swap(managed: dict, swap: dict) -> None:
    s, w = swap["started"], swap["swapped"]
    same, n = swap["same_first_replies"]
    print(f"\nserver start s: managed {managed.get('start_s')} ({managed.get('how')}), reload-mode server {s.get('start_s')} ({s.get('how')})")
    print(f"weight swap ({w.get('how')}): reload_s {w.get('reload_s')}, reset_s {w.get('reset_s')}; "
          f"(reload+reset) / managed start_s = {(w.get('reload_s', 0) + w.get('reset_s', 0)) / managed['start_s']:.3f}; same pid: {s['pid'] == w['pid']}")
    print(f"reloaded server's greedy first replies equal to checkpoint 2 in process: {same}/{n}")


def print_adapter(managed: dict, lora: dict) -> None:
    b, a = lora["base"], lora["adapter"]
    same, n = lora["same_as_merged"]
    print(f"\nlora mode: server start_s {b.get('start_s')} ({b.get('how')}); adapter ({a.get('adapter')}) on the same pid: {a['pid'] == b['pid']}, "
          f"adapter_load_s {a.get('adapter_load_s')}; load / managed start_s = {a.get('adapter_load_s', 0) / managed['start_s']:.4f}")
    print(f"adapter's greedy first replies equal to the merged checkpoint in process: {same}/{n} (equal to the base's: {lora['same_as_base']}/{n})")
    best = {k: min(rs, key=lambda r: r["wall"]) for k, rs in lora["runs"].items()}
    n_eps = len(best["base"]["eps"])
    # The adapter's replies differ from the base's (other episode lengths, other reply lengths): compare tokens/s, not only ep/s.
    print(f"greedy episodes on the lora server ({n_eps} each): " + ", ".join(f"{k} {n_eps / r['wall']:.2f} ep/s, {r['tokens']} tokens, {r['tokens'] / r['wall']:.0f} tok/s" for k, r in best.items())
          + f"; tokens/s adapter / base = {(best['adapter']['tokens'] / best['adapter']['wall']) / (best['base']['tokens'] / best['base']['wall']):.2f}x")


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    make = partial(make_env, "babyai", LEVEL, args.max_steps)
    sampling_cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, batch_size=args.concurrency, history_turns=args.history)
    sets = episode_sets(make, args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = make()
        path = Path(args.model) if args.model else tiny_checkpoint(env, tmp, args.sft_epochs, args.history)
        env.close()
        path2 = other_weights(path, tmp / "other", seed=args.seed + 1)
        uri1, uri2 = to_store(tmp / "store", "ckpt-1", path), to_store(tmp / "store", "ckpt-2", path2)
        path3 = with_adapter(path, uri1, tmp / "adapted", args.lora_rank, seed=args.seed + 2)
        uri3 = to_store(tmp / "store", "ckpt-3", path3)
        model = args.model or f"tiny {TINY.hidden_size}x{TINY.num_layers}, sft {args.sft_epochs:g} epochs"
        print(f"model {model}; checkpoints {store.digest(uri1)[:12]} / {store.digest(uri2)[:12]}; episodes: " + ", ".join(f"{k} {len(v[0])}" for k, v in sets.items())
              + f"; threads {args.threads}, concurrency {args.concurrency}, max_steps {args.max_steps}, max_new_tokens {args.max_new_tokens}, history {args.history}, repeat {args.repeat}")
        try:
            runs, managed = throughput(make, path, uri1, sets, sampling_cfg, args)
            stop_servers()  # the managed server's cores back before the reload-mode server starts
            swap = weight_swap(make, uri1, uri2, path2, sampling_cfg, args)
            stop_servers()
            lora = adapter_serving(make, uri1, uri3, path3, sets, sampling_cfg, args)
        finally:
            left = stop_servers()
    print_runs(runs, sets)
    print_greedy(runs)
    print_swap(managed, swap)
    print_adapter(managed, lora)
    print(f"\nvllm.entrypoints processes left: {left or 'none'}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
