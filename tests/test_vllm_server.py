"""The IPR loop with every generation through real vLLM servers (vLLM's CPU
build in its own venv, `bash .ci/vllm.sh`; skipped with the reason when it is
not installed):

- managed (`ipr run`, Prefect, threads runner): the pipeline starts a server
  per checkpoint and stops it by PID; the server is SIGKILLed while a stage is
  generating, the stage is retried on a server started again, and the run
  completes;
- reload (in-process run): one server whose weights are swapped, prefix cache
  reset, for each new checkpoint;
- external: a server that serves another checkpoint makes the stage fail
  before it generates;
- lora (in-process run, 2 iterations trained with LoRA): one server holds the
  SFT model, serves it to the scorer, and serves each iteration as a LoRA
  adapter loaded at run time under the iteration's name;

and each generating stage's manifest records a served identity whose
checkpoint digest is that of the model the stage was meant to use. Greedy
evaluation through the server equals the in-process transformers backend's.
"""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from ipr_core import store
from ipr_core.config import load_config

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = os.environ.get("IPR_VLLM_PYTHON") or str(ROOT / ".vllm-venv" / "bin" / "python")

pytest.importorskip("minigrid")


def _has_vllm() -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    return Path(VLLM_PY).exists() and subprocess.run([VLLM_PY, "-c", probe], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _has_vllm(), reason=f"vLLM's CPU build is not installed at {VLLM_PY} (bash .ci/vllm.sh, or set IPR_VLLM_PYTHON)"),
]

# vLLM's CPU attention needs head_dim >= 32 (64 / 2 heads); an untied output layer
# (reload); a fixed, small KV cache (a fraction of RAM would be GBs per server).
SERVER_ARGS = ["--kv-cache-memory-bytes", str(256 * 2**20), "--no-enable-chunked-prefill", "--dtype", "float32", "--max-model-len", "512", "--enforce-eager"]


def config(root: Path, mode: str, run_name: str, *, seed: int = 3, backend: str = "openai", urls: tuple[str, ...] = ()) -> dict:
    return {
        "run_name": run_name,
        "seed": seed,
        "env": {"name": "babyai", "options": {"level": "BabyAI-GoToObj-v0"}, "train_tasks": 4, "eval_tasks": 4},
        "model": {
            "backend": backend,
            "tiny": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 128, "vocab_size": 320,
                     "max_position_embeddings": 512, "tokenizer_corpus_episodes": 8, "tie_embeddings": False},
            "server": {"mode": mode, "python": VLLM_PY, "max_servers": 1, "args": SERVER_ARGS, "start_timeout_s": 600, "urls": list(urls)},
            "openai": {"max_concurrency": 8, "timeout_s": 120, "max_retries": 2, "backoff_s": 0.5},
        },
        "sampling": {"max_new_tokens": 12, "batch_size": 16, "history_turns": 1},
        "mc": {"n_rollouts": 2, "shard_size": 2, "expert_steps": "all"},  # every expert step: the scorer serves rollouts up front
        "training": {"sft": {"epochs": 1, "lr": 0.002, "batch_size": 8}, "ipr": {"epochs": 1, "batch_size": 4}},
        "pipeline": {"iterations": 1, "eval_base": False, "max_workers": 1, "torch_threads": 1, "retries": 2, "retry_delay_s": 1.0},
        "storage": {"root": str(root)},
    }  # fmt: skip


def served_stages(run: str) -> dict[str, dict]:
    """Every complete artifact of ``run`` whose manifest records a server: key -> (served, the model input's digest)."""
    out = {}
    for info in store.ls(run):
        m = store.read_manifest(info.uri) if info.complete else None
        if m is not None and "served" in m.meta:
            models = [d for uri, d in m.inputs.items() if uri.rstrip("/").endswith("/model")]
            out[info.uri[len(run) :].strip("/")] = {**m.meta["served"], "input_model_digests": models}
    return out


def assert_each_stage_served_its_checkpoint(run: str, expected: set[str]) -> dict[str, dict]:
    served = served_stages(run)
    assert expected <= set(served), sorted(served)
    for key, s in served.items():
        assert s["input_model_digests"] == [s["checkpoint_digest"]], key  # the model it was meant to use, and only it
    return served


def group_alive(pgid: int) -> bool:
    from ipr_core.policies.serving import _group_alive

    return _group_alive(pgid)


def test_managed_servers_follow_the_checkpoints_and_a_killed_server_is_started_again(tmp_path):
    cfg_path = tmp_path / "managed.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp_path / "root", "managed", "managed")))
    logs_before = set(glob.glob(os.path.join(tempfile.gettempdir(), "ipr-server-*.log")))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT)}
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ipr_cli.main", "run", "-c", str(cfg_path)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            killed = kill_a_server_mid_stage(proc, logs_before)
            proc.wait(timeout=1800)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert proc.returncode == 0, text[-5000:]
    assert killed is not None, "no server was seen answering a completion"
    run = store.join(str(tmp_path / "root"), "managed")
    served = assert_each_stage_served_its_checkpoint(run, {"eval/test/sft", "eval/test/iter-01", "scorer/expert_mc/shard-000", "iter-01/explore/shard-000"})
    assert all(s["mode"] == "managed" and s["served_model"] == "ckpt-" + s["checkpoint_digest"] for s in served.values())
    sft = store.digest(store.join(run, "sft/model"))
    after_kill = {s["pid"] for s in served.values() if s["checkpoint_digest"] == sft} - {killed}
    assert after_kill, "no sft stage ran on a server started after the kill"
    pids = {s["pid"] for s in served.values()} | {killed}  # each server's process group
    assert len(pids) >= 3, pids  # sft's server, its replacement, iter-01's (max_servers=1)
    assert "Retrying" in text or "retry" in text.lower(), text[-3000:]
    assert not [p for p in pids if group_alive(p)], "a managed server outlived its run"


def run_servers(proc: subprocess.Popen) -> list[int]:
    """The vLLM API server processes the run ``proc`` started (its descendants)."""
    import psutil

    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [k.pid for k in kids if "vllm.entrypoints.openai.api_server" in " ".join(_cmdline(k))]


def _cmdline(p) -> list[str]:
    import psutil

    try:
        return p.cmdline()
    except psutil.Error:
        return []


def kill_a_server_mid_stage(proc: subprocess.Popen, logs_before: set[str]) -> int | None:
    """SIGKILL the run's server once its log shows a chat completion answered
    (a stage is generating with it; vLLM's lines carry its pid); its process group."""
    deadline = time.time() + 1200
    while proc.poll() is None and time.time() < deadline:
        logs = [Path(p).read_text(errors="replace") for p in set(glob.glob(os.path.join(tempfile.gettempdir(), "ipr-server-*.log"))) - logs_before]
        for pid in run_servers(proc):
            if any(f"(APIServer pid={pid})" in t and '"POST /v1/chat/completions HTTP/1.1" 200' in t for t in logs):
                group = os.getpgid(pid)  # the guard's: what manifests record as the server's pid
                os.killpg(group, signal.SIGKILL)
                return group
        time.sleep(0.5)
    return None


def test_reload_swaps_weights_in_one_server_and_external_refuses_another_checkpoint(tmp_path):
    from ipr_core.pipeline import run_local
    from ipr_core.policies.serving import ServerError, ServerPool, spec_of
    from ipr_core.resources import process_wide

    root = tmp_path / "root"
    cfg = load_config(base=config(root, "reload", "reload"))
    spec = spec_of(cfg.model.server)
    pool = process_wide(("model-servers", spec), lambda: ServerPool(spec))
    try:
        run_local(cfg)
        run = store.join(str(root), "reload")
        served = assert_each_stage_served_its_checkpoint(run, {"eval/test/sft", "eval/test/iter-01", "scorer/expert_mc/shard-000"})
        assert len({s["pid"] for s in served.values()}) == 1  # one process throughout
        swapped = served["eval/test/iter-01"]
        assert swapped["how"] in ("reloaded", "reused") and swapped["checkpoint_digest"] == store.digest(store.join(run, "iter-01/model"))
        assert any(s["how"] == "reloaded" and s["prefix_cache_reset"] for s in served.values())

        # greedy evaluation through the server == the in-process backend on the same checkpoint
        run_local(load_config(base=config(root, "reload", "in-process", backend="transformers")), until="eval/test/sft")  # sft/model copied
        rows = {name: sorted(store.read_rows(store.join(str(root), name, "eval/test/sft"), "eval"), key=lambda r: r["task_id"]) for name in ("reload", "in-process")}
        fields = ("task_id", "outcome_reward", "success", "n_steps")
        assert [tuple(r[f] for f in fields) for r in rows["reload"]] == [tuple(r[f] for f in fields) for r in rows["in-process"]]

        # a server holding iter-01's weights is not used for another run's sft checkpoint (seed 4: computed, not copied)
        [server] = pool.servers
        ext = load_config(base=config(root, "external", "external", seed=4, urls=(server.base_url,)))
        with pytest.raises(ServerError, match="no server serves checkpoint"):
            run_local(ext)
        assert not store.exists(store.join(str(root), "external", "eval/test/sft"))
    finally:
        groups = [srv.proc.pid for srv in pool.servers]
        pool.stop_all()
    assert groups and not any(group_alive(g) for g in groups)


def test_lora_serves_the_iterations_as_adapters_of_one_sft_server(tmp_path):
    from ipr_core.pipeline import run_local
    from ipr_core.policies.serving import ServerPool, served_name, spec_of
    from ipr_core.resources import process_wide

    pytest.importorskip("peft")
    root = tmp_path / "root"
    base = config(root, "lora", "lora")
    base["model"]["server"]["max_lora_rank"] = 16
    base["training"]["ipr"].update({"lora": True, "lora_r": 8, "lr": 0.05, "epochs": 2})  # steps large enough to move the logits
    base["pipeline"]["iterations"] = 2
    cfg = load_config(base=base)
    spec = spec_of(cfg.model.server)
    pool = process_wide(("model-servers", spec), lambda: ServerPool(spec))
    try:
        run_local(cfg)
        run = store.join(str(root), "lora")
        served = assert_each_stage_served_its_checkpoint(
            run, {"eval/test/sft", "scorer/expert_mc/shard-000", "iter-01/explore/shard-000", "iter-02/explore/shard-000", "eval/test/iter-01", "eval/test/iter-02"}
        )
        sft = served_name(store.digest(store.join(run, "sft/model")))
        assert len({s["pid"] for s in served.values()}) == 1  # one server process throughout
        for key in ("eval/test/iter-01", "iter-02/explore/shard-000", "eval/test/iter-02"):
            s = served[key]
            assert s["mode"] == "lora" and s["served_model"] == "ckpt-" + s["checkpoint_digest"] and s["parent"] == s["base_model"] == sft, key
            assert s["root"].endswith("/adapter"), key
        assert served["eval/test/sft"]["served_model"] == sft and "parent" not in served["eval/test/sft"]
        ranks = [adapter_rank(store.read_checkpoint(store.join(run, f"iter-0{k}/model"))) for k in (1, 2)]
        assert ranks == [8, 16]  # iteration 2's adapter holds both iterations' factors

        # what the server computes with an adapter is the merged checkpoint's, not the base's
        [server] = pool.servers
        prompts = ["Thought: I should go to the red ball.\nAction:", "Observation: You see a wall.", "go forward"]
        for tag in ("iter-01", "iter-02"):
            name = served[f"eval/test/{tag}"]["served_model"]
            local = store.read_checkpoint(store.join(run, f"{tag}/model"))
            got = [server_logprob(server.base_url, name, p) for p in prompts]
            off_base = max(abs(a - b) for a, b in zip(got, [server_logprob(server.base_url, sft, p) for p in prompts]))
            assert got == pytest.approx([local_logprob(local, p) for p in prompts], abs=2e-3), tag
            assert off_base > 5e-2, tag

        # greedy evaluation through the adapters == in-process transformers on the merged checkpoints
        fields = ("task_id", "outcome_reward", "success", "n_steps")
        for tag in ("iter-01", "iter-02"):
            through = sorted(store.read_rows(store.join(run, f"eval/test/{tag}"), "eval"), key=lambda r: r["task_id"])
            in_process = sorted(merged_eval(cfg, run, tag), key=lambda r: r["task_id"])
            assert [tuple(r[f] for f in fields) for r in through] == [tuple(r[f] for f in fields) for r in in_process], tag
    finally:
        groups = [srv.proc.pid for srv in pool.servers]
        pool.stop_all()
    assert groups and not any(group_alive(g) for g in groups)


def adapter_rank(checkpoint_dir: Path) -> int:
    import json

    return json.loads((checkpoint_dir / "adapter" / "adapter_config.json").read_text())["r"]


def merged_eval(cfg, run: str, tag: str) -> list[dict]:
    """The eval rows of checkpoint ``tag``'s merged weights, played in-process on the run's test tasks."""
    from ipr_core import ipr
    from ipr_core.pipeline.stages import _env_factory, _sampling
    from ipr_core.policies.factory import make_policy
    from ipr_core.types import Task

    tasks = [Task.from_row(r) for r in store.read_rows(store.join(run, "tasks/test"), "tasks")]
    local = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backend": "transformers"})})
    policy = make_policy(local.model, cfg.sampling, str(store.read_checkpoint(store.join(run, f"{tag}/model"))))
    eps = ipr.run_specs(_env_factory(cfg), policy, ipr.eval_specs(tasks, cfg.seed, tag), _sampling(cfg, cfg.sampling.explore_temperature), history=cfg.sampling.history_turns)
    return ipr.eval_rows(eps, tag, int(tag[-2:]))


def server_logprob(base_url: str, model: str, prompt: str) -> float:
    """The log-probability of the greedy next token after ``prompt``, as the server computes it for ``model``."""
    import httpx

    r = httpx.post(base_url + "/completions", json={"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "logprobs": 1}, timeout=60)
    r.raise_for_status()
    return float(r.json()["choices"][0]["logprobs"]["token_logprobs"][0])


def local_logprob(checkpoint_dir: Path, prompt: str) -> float:
    """The same, in-process with transformers (the largest next-token log-probability)."""
    import torch

    from ipr_core.policies.checkpoint_io import load_causal_lm, load_tokenizer

    tok, model = load_tokenizer(checkpoint_dir), load_causal_lm(checkpoint_dir).eval()
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        return float(torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1).max())
