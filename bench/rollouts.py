"""Rollout throughput: the lock-step runner vs one episode at a time, and prefix sharing.

    .venv/bin/python bench/rollouts.py [--episodes 96] [--env auto|babyai|lineworld]

Measured in one run, same tasks, model and seeds:
1. episodes/s of ``run_episodes`` (32 in flight, one generate call per turn,
   a finished episode's slot taken by the next of 96, as in the pipeline's
   stages, which run hundreds) vs ``run_sequential`` (one episode, one request
   per call), greedy, with the
   trajectories checked equal; where the time goes (generation vs environment,
   prefill vs decode; decode steps and the live rows per step, against the
   steps a full batch would take: replies of one turn end at different lengths).
   The runners alternate ``--repeat`` times at each of ``--threads`` torch
   thread counts, and each is compared at its fastest (a shared machine's
   speed drifts between runs, and the runners need not be fastest at the
   same thread count; the pipeline's default is torch's, one per core); the
   ratios at equal thread counts are printed too.
   With ``--replicas R`` (default 2) the lock-step runner also runs over
   ``model.replicas=R`` worker processes (``policies/replicated.py``), each
   answering the turns of its own cohort of the slots with the cores shared
   out (a second core used by a second copy of the model, since intra-op
   threads gain little at this size).
2. Monte Carlo from expert states (N rollouts per state, temperature 1):
   prefill tokens per rollout with and without prefix sharing.

The model is the default tiny config (~1 M parameters) with a tokenizer
trained on the environment's text, fine-tuned for ``--sft-epochs`` on expert
episodes of the train split, so that it behaves like the policies the pipeline
runs: well-formed, varied replies, episodes that end at different turns,
contexts that change every turn (an untrained model repeats one malformed reply
to one constant observation, so from the third turn on its whole window repeats
and a prefix cache would serve everything: ``--sft-epochs 0`` shows that
degenerate case). Expert replies average 24 tokens (with <|im_end|>)
and expert episodes 5.5 steps; ``--max-new-tokens`` is the demo's 40. BabyAI is used when ``ipr_core.envs.babyai`` and minigrid
are importable, else the LineWorld fake from tests/.

Both runners share one policy, whose prefix KV cache (earlier turns' prompts
and replies, the system prompt) is emptied before each timed run.

Measured results (the ratios, the replicas' gain, the MC prefill tokens):
docs/performance.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ipr_core.config import SamplingConfig, TinyModelConfig  # noqa: E402
from ipr_core.policies.base import SamplingParams  # noqa: E402
from ipr_core.rollout import EpisodeSpec, RolloutStats, run_episodes, run_sequential  # noqa: E402


class TimedPolicy:
    """Wraps a policy to time its generate calls (the same way for both runners)."""

    def __init__(self, policy):
        self.policy = policy
        self.seconds = 0.0
        self.calls = 0

    def _timed(self, call, *args):
        t0 = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1

    def generate(self, conversations, sampling, seeds):
        return self._timed(self.policy.generate, conversations, sampling, seeds)

    # The lane interface (ReplicatedPolicy): passed through, collect timed like generate.
    @property
    def lanes(self):
        return getattr(self.policy, "lanes", 1)

    def submit(self, lane, conversations, sampling, seeds):
        self.policy.submit(lane, conversations, sampling, seeds)

    def collect(self):
        return self._timed(self.policy.collect)

    def drain(self):
        self.policy.drain()

    def close(self):
        pass


def pick_env(name: str, max_steps: int):
    if name in ("auto", "babyai") and importlib.util.find_spec("ipr_core.envs.babyai") and importlib.util.find_spec("minigrid"):
        from ipr_core.envs.base import make_env

        return "babyai", partial(make_env, "babyai", None, max_steps)
    if name == "babyai":
        raise SystemExit("BabyAI is not available (ipr_core.envs.babyai or minigrid missing)")
    from fake_env import LineWorld

    return "lineworld", partial(LineWorld, max_steps=max_steps)


def expert_trajectories(env, tasks):
    from ipr_core.experts import collect_experts

    return [t for t in collect_experts(env, tasks) if t.error is None and t.success]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="auto", choices=["auto", "babyai", "lineworld"])
    ap.add_argument("--episodes", type=int, default=96, help="episodes run by each runner")
    ap.add_argument("--concurrency", type=int, default=32, help="episodes in flight in the lock-step runner (= its generate batch)")
    ap.add_argument("--prefix-cache-mb", type=float, default=SamplingConfig.model_fields["prefix_cache_mb"].default, help="KV kept across generate calls (0: none, sharing within a call only)")
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=40, help="the demo's setting; trained replies stop at <|im_end|> (~24 tokens)")
    ap.add_argument("--history", type=lambda s: None if s in ("full", "none", "None") else int(s), default=2, help="past steps in the prompt (sampling.history_turns): an int, or full (the paper)")
    ap.add_argument("--mc-states", type=int, default=8, help="expert states scored by MC")
    ap.add_argument("--mc-n", type=int, default=5, help="rollouts per state (paper N=5)")
    ap.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                    help="torch thread counts to run each runner with, comma-separated; each runner is compared at its fastest "
                         "(on this 2-core machine: one episode at a time is fastest on 1, the lock-step runner on 2)")
    ap.add_argument("--replicas", type=int, default=2, help="also run the lock-step runner over this many replica processes (model.replicas; each with the cores shared out); <= 1: skip")
    ap.add_argument("--sft-epochs", type=float, default=2.0, help="fine-tuning before measuring (0: the untrained model)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs of each runner; the fastest of each is compared (this machine's speed drifts by 20%% and more)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    torch.set_num_threads(args.threads[0])  # setup and fine-tuning
    from ipr_cli.model import tokenizer_corpus
    from ipr_core import ipr
    from ipr_core.conversation import render_context
    from ipr_core.policies.hf import TransformersPolicy
    from ipr_core.policies.tiny import build_tiny_model

    env_name, make = pick_env(args.env, args.max_steps)
    env = make()
    tasks = env.list_tasks("test", n=args.episodes, seed=0)
    train = env.list_tasks("train", n=max(args.mc_states, 32), seed=0)
    corpus = tokenizer_corpus(env, train)
    demos = expert_trajectories(env, env.list_tasks("train", n=400, seed=1)) if args.sft_epochs > 0 else []
    experts = expert_trajectories(env, train)[: args.mc_states]
    env.close()

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(TinyModelConfig(), corpus, Path(tmp) / "model")
        if demos:
            from ipr_core.config import SFTConfig
            from ipr_core.training.sft import train_sft

            sft = SFTConfig(epochs=args.sft_epochs, lr=2e-3, batch_size=16, warmup_ratio=0.02)
            train_sft(path, demos, sft, args.history, Path(tmp) / "sft", precision="auto")
            path = Path(tmp) / "sft"
        policy = TransformersPolicy(path, device=args.device, dtype=args.dtype, batch_size=args.concurrency, prefix_cache_mb=args.prefix_cache_mb)
        replicated = None
        if args.replicas > 1:  # started (spawned, the model loaded) before any timing, like the in-process policy
            from ipr_core.config import ModelConfig
            from ipr_core.policies.factory import make_policy

            replicated = make_policy(ModelConfig(device=args.device, dtype=args.dtype, replicas=args.replicas), SamplingConfig(batch_size=args.concurrency, prefix_cache_mb=args.prefix_cache_mb), str(path))
    n_params = sum(p.numel() for p in policy.model.parameters())
    print(f"env={env_name}  model: {n_params / 1e6:.2f} M params, {policy.device} {next(policy.model.parameters()).dtype}, threads {','.join(map(str, args.threads))}  "
          f"episodes={args.episodes} concurrency={args.concurrency} prefix_cache={args.prefix_cache_mb:g}MB max_steps={args.max_steps} max_new_tokens={args.max_new_tokens} history={args.history} "
          f"sft={args.sft_epochs:g} epochs on {len(demos)} expert episodes")

    # --- 1. lock-step vs sequential ---------------------------------------------------
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    specs = [EpisodeSpec(f"ep{i}", t, seed=i, source="eval") for i, t in enumerate(tasks)]
    for p in (policy, replicated):
        if p is not None:
            p.generate([[{"role": "user", "content": "warm up"}]], greedy, [0])  # first-call overheads out of the timings

    def timed_run(run, pol=policy):
        timed = TimedPolicy(pol)
        pol.reset_stats()
        pol.clear_prefix_cache()  # each run starts cold: nothing computed by an earlier one is reused
        got: list[RolloutStats] = []
        t0 = time.perf_counter()
        out = run(timed, got.append)
        return out, (time.perf_counter() - t0, timed.seconds, timed.calls, pol.stats, got[0].env_s if got else None)

    lock_run = lambda p, cb: run_episodes(make, p, specs, greedy, history=args.history, batch_size=args.concurrency, on_stats=cb)  # noqa: E731
    rep_name = f"lock-step x{args.replicas}"
    runs: dict[str, list] = {"sequential": [], "lock-step": []}  # (threads, run) in the order run
    if replicated is not None:
        runs[rep_name] = []
    same = True
    reference = None
    for _ in range(args.repeat):  # interleaved, so a slow spell of a shared machine hits both runners
        for threads in args.threads:
            torch.set_num_threads(threads)
            seq, r = timed_run(lambda p, cb: run_sequential(make, p, specs, greedy, history=args.history))
            runs["sequential"].append((threads, r))
            lock, r = timed_run(lock_run)
            runs["lock-step"].append((threads, r))
            reference = reference or seq
            same = same and lock == seq == reference
        if replicated is not None:  # its replicas' threads are fixed (the cores shared out)
            rep, r = timed_run(lock_run, replicated)
            runs[rep_name].append((replicated.threads, r))
            same = same and rep == reference
    # Each runner at its fastest: its best thread count, its least disturbed run.
    best = {name: min(rs, key=lambda tr: tr[1][0]) for name, rs in runs.items()}
    (_, (seq_s, *_)), (lock_threads, (lock_s, *_, lock_env)) = best["sequential"], best["lock-step"]

    steps = sum(len(t.steps) for t in seq)
    print(f"\n== lock-step runner vs sequential loop (greedy, same tasks/model/seeds; each at its fastest of {args.repeat} interleaved runs x threads {args.threads}) ==")
    print(f"{'runner':<12}{'threads':>8}{'wall s':>8}{'ep/s':>8}{'generate s':>12}{'(prefill':>10}{'decode)':>9}{'env+other s':>13}{'gen calls':>11}{'prefill tok':>13}{'dec steps':>11}{'rows/step':>11}  fastest wall s by threads")
    for name, (threads, (wall, gen, calls, st, _)) in best.items():
        if name == rep_name:
            threads = f"{args.replicas}x{threads}"
            by = f"all runs: {' '.join(f'{r[0]:.2f}' for _, r in runs[name])} (prefill/decode s summed over the replicas)"
        else:
            by = "  ".join(f"{t}: {min(r[0] for th, r in runs[name] if th == t):.2f}" for t in args.threads)
        print(f"{name:<12}{threads:>8}{wall:>8.2f}{len(specs) / wall:>8.2f}{gen:>12.2f}{st.prefill_s:>10.2f}{st.decode_s:>9.2f}{wall - gen:>13.2f}{calls:>11}{st.prefill_tokens:>13}{st.decode_steps:>11}{st.mean_decode_rows:>11.1f}  {by}")
    lock_st = best["lock-step"][1][3]
    print(f"lock-step decode: {lock_st.decode_steps} steps at {lock_st.mean_decode_rows:.1f} live rows on average; "
          f"{-(-lock_st.decode_rows // args.concurrency)} steps would carry the same rows at a full batch of {args.concurrency} "
          f"(replies end at different lengths within a turn, and the last episodes run with free slots)")
    same_threads = {t: min(r[0] for th, r in runs["sequential"] if th == t) / min(r[0] for th, r in runs["lock-step"] if th == t) for t in args.threads}
    print(f"speed-up: {seq_s / lock_s:.1f}x episodes/s at {args.concurrency} concurrent episodes (each runner at its fastest; at equal threads: "
          f"{'  '.join(f'{t}: {x:.1f}x' for t, x in same_threads.items())}) ({len(specs)} episodes, {steps} steps in all; "
          f"lock-step env time {lock_env:.2f}s; trajectories identical: {same})")
    if replicated is not None:
        rep_s = best[rep_name][1][0]
        print(f"speed-up with {args.replicas} replica processes (data parallel, each {replicated.threads} thread(s)): {seq_s / rep_s:.1f}x episodes/s "
              f"vs the sequential loop at its fastest; {lock_s / rep_s:.2f}x vs the in-process lock-step runner at its fastest")
        replicated.close()
    torch.set_num_threads(lock_threads)  # the MC part runs the lock-step runner

    # --- 2. MC prefix sharing ---------------------------------------------------------
    targets = [tg for tg in ipr.expert_targets(experts) if not ipr.is_last_step(tg)]
    mc = ipr.mc_specs(targets, args.mc_n, run_seed=0)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens)
    print(f"\n== MC rollouts: {len(targets)} expert states x N={args.mc_n} = {len(mc)} rollouts, temperature 1 ==")
    print(f"{'prefix sharing':<16}{'prefill tok/rollout':>20}{'1st-turn prefill tok/rollout':>30}{'wall s':>8}{'rollouts/s':>12}")
    # First-turn contexts straight from the expert records (replay is exact).
    by_id = {e.traj_id: e for e in experts}
    first_turn = [render_context(by_id[s.key.split("|")[0]].system, by_id[s.key.split("|")[0]].instruction, s.prefix, args.history) for s in mc]
    rows = {}
    for sharing in (False, True):
        policy.prefix_sharing = sharing
        policy.reset_stats()
        policy.clear_prefix_cache()
        policy.generate(first_turn, sampled, [s.seed for s in mc])
        first = policy.stats.prefill_tokens / len(mc)
        policy.reset_stats()
        policy.clear_prefix_cache()
        t0 = time.perf_counter()
        out = run_episodes(make, policy, mc, sampled, history=args.history, batch_size=args.concurrency)
        wall = time.perf_counter() - t0
        rows[sharing] = out
        print(f"{'on' if sharing else 'off':<16}{policy.stats.prefill_tokens / len(mc):>20.1f}{first:>30.1f}{wall:>8.2f}{len(mc) / wall:>12.2f}")
    print(f"first-turn prefill: each expert state is computed once per {args.mc_n} rollouts with sharing "
          f"(later turns diverge); rollouts identical with and without sharing: {rows[True] == rows[False]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
