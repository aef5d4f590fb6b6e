"""The server lifecycle of model.backend=openai (ipr_core.policies.serving),
fast: the servers are real processes on 127.0.0.1 started, checked, reused,
reloaded, restarted and stopped by PID exactly as vLLM's would be, but run
tests/fake_vllm's stand-in of vLLM's OpenAI server (same command line and
endpoints) so that each start takes a second, not minutes. The real vLLM
server runs the same paths in tests/test_vllm_server.py."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

from ipr_core import store
from ipr_core.config import ConfigError, ModelConfig, SamplingConfig
from ipr_core.policies.base import SamplingParams
from ipr_core.policies.factory import make_policy
from ipr_core.policies.serving import ServerError, ServerPool, _group_alive, check_external, check_servers, connect, served_name, spec_of

FAKE = str(Path(__file__).parent / "fake_vllm")
CONV = [{"role": "system", "content": "s"}, {"role": "user", "content": "go"}]


@pytest.fixture
def checkpoints(tmp_path):
    """Three checkpoint artifacts (a, b, c) in a local store, each a folder naming its weights."""
    out = {}
    for name in "abc":
        d = tmp_path / "src" / name
        d.mkdir(parents=True)
        (d / "weights.txt").write_text(f"weights-{name}")
        (d / "model.safetensors").write_bytes(name.encode())  # the store wants one; the stand-in reads weights.txt
        store.write_checkpoint(str(tmp_path / "store" / name), d)
        out[name] = str(tmp_path / "store" / name)
    return out


def model_cfg(mode: str, **server) -> ModelConfig:
    return ModelConfig(backend="openai", server={"mode": mode, "python": sys.executable, "env": {"PYTHONPATH": FAKE}, "start_timeout_s": 60, **server})


def reply(cfg: ModelConfig, served, seed: int = 7) -> str:
    policy = make_policy(cfg, SamplingConfig(), "unused", served)
    try:
        return policy.generate([CONV], SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=8), [seed])[0]
    finally:
        policy.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def pool_of(cfg: ModelConfig) -> ServerPool:
    from ipr_core.resources import process_wide

    spec = spec_of(cfg.server)
    return process_wide(("model-servers", spec), lambda: ServerPool(spec))


@contextlib.contextmanager
def servers(cfg: ModelConfig) -> Iterator[ServerPool]:
    """The process's pool for ``cfg``; every server it started is stopped (by group) at the end."""
    pool = pool_of(cfg)
    try:
        yield pool
    finally:
        groups = [s.proc.pid for s in pool.servers]
        pool.stop_all()
        assert not any(_group_alive(g) for g in groups)


def test_managed_starts_a_server_per_checkpoint_reuses_it_and_stops_the_least_recent_by_pid(checkpoints):
    cfg = model_cfg("managed", max_servers=2, args=["--extra-flag", "1"])
    with servers(cfg) as pool:
        assert not pool.servers
        served_a, release_a = connect(cfg, checkpoints["a"])
        digest_a = store.digest(checkpoints["a"])
        assert served_a.model == served_name(digest_a) and served_a.identity["served_model"] == served_a.model
        assert served_a.identity["checkpoint_digest"] == digest_a and served_a.identity["how"] == "started"
        assert reply(cfg, served_a).endswith("weights-a-7")
        pid_a = served_a.identity["pid"]
        release_a()
        again, release = connect(cfg, checkpoints["a"])  # same digest: the same process
        assert again.identity["pid"] == pid_a and again.identity["how"] == "reused"
        release()
        served_b, release_b = connect(cfg, checkpoints["b"])
        assert served_b.identity["pid"] != pid_a and reply(cfg, served_b).endswith("weights-b-7")
        served_c, release_c = connect(cfg, checkpoints["c"])  # a third: a (idle, least recent) is stopped
        assert not alive(pid_a) and alive(served_b.identity["pid"]) and reply(cfg, served_c).endswith("weights-c-7")
        release_b(), release_c()
        assert len(pool.servers) == 2


def test_a_managed_server_that_died_is_started_again(checkpoints):
    cfg = model_cfg("managed", max_servers=1)
    with servers(cfg) as pool:
        served, release = connect(cfg, checkpoints["a"])
        release()
        os.killpg(served.identity["pid"], 9)
        pool.servers[0].proc.wait()
        again, release = connect(cfg, checkpoints["a"])
        assert again.identity["how"] == "started" and again.identity["pid"] != served.identity["pid"]
        assert reply(cfg, again).endswith("weights-a-7")
        release()


def test_reload_swaps_weights_in_the_same_process_and_resets_the_prefix_cache(checkpoints):
    cfg = model_cfg("reload", max_servers=1)
    with servers(cfg) as pool:
        first, release = connect(cfg, checkpoints["a"])
        release()
        second, release = connect(cfg, checkpoints["b"])
        assert second.identity["pid"] == first.identity["pid"] and second.identity["how"] == "reloaded"
        assert second.identity["prefix_cache_reset"] is True and second.identity["checkpoint_digest"] == store.digest(checkpoints["b"])
        assert reply(cfg, second).endswith("weights-b-7")
        release()


def test_an_external_server_serving_another_checkpoint_is_refused_before_any_request(checkpoints):
    cfg = model_cfg("managed")
    with servers(cfg) as pool:
        served_a, release = connect(cfg, checkpoints["a"])  # a running server that serves a
        ext = ModelConfig(backend="openai", server={"mode": "external", "urls": [served_a.base_url]})
        with pytest.raises(ServerError, match=r"no server serves checkpoint .*/b .*--served-model-name ckpt-"):
            connect(ext, checkpoints["b"])
        ok, _ = connect(ext, checkpoints["a"])
        assert ok.base_url == served_a.base_url and ok.identity["mode"] == "external" and ok.identity["root"]
        release()


def test_seeds_can_be_left_out_of_requests(checkpoints):
    cfg = model_cfg("managed", max_servers=1)
    with servers(cfg) as pool:
        served, release = connect(cfg, checkpoints["a"])
        no_seed = cfg.model_copy(update={"openai": cfg.openai.model_copy(update={"send_seed": False})})
        assert reply(cfg, served).endswith("-7") and reply(no_seed, served).endswith("-none")
        release()


def test_preflight_names_the_field_of_an_unreachable_server_or_a_python_without_vllm():
    with pytest.raises(ConfigError, match=r"model\.server\.urls: the server at http://127\.0\.0\.1:9/v1 does not answer"):
        check_servers(ModelConfig(backend="openai", server={"mode": "external", "urls": ["http://127.0.0.1:9/v1"]}))
    with pytest.raises(ConfigError, match=r"model\.server\.mode=managed: .* cannot import vllm"):
        check_servers(ModelConfig(backend="openai", server={"mode": "managed", "python": sys.executable}))
    with pytest.raises(ServerError):
        check_external(["http://127.0.0.1:9/v1"], "0" * 32, "file:///nowhere")


def test_a_server_that_cannot_start_fails_the_stage_with_its_own_output(checkpoints):
    cfg = ModelConfig(backend="openai", server={"mode": "managed", "python": sys.executable, "start_timeout_s": 60})  # no vllm on its path
    with pytest.raises(ServerError, match=r"(?s)exited with status 1.*No module named 'vllm'"):
        connect(cfg, checkpoints["a"])
    assert not pool_of(cfg).servers


PARENT = """
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
from test_serving import connect, model_cfg
served, _ = connect(model_cfg("managed"), {uri!r})
print(served.identity["pid"], flush=True)
time.sleep(600)
"""


def test_a_managed_server_does_not_outlive_a_killed_pipeline_process(checkpoints, tmp_path):
    """SIGKILL skips exit hooks: the guard the server runs under stops it when its parent is gone."""
    import subprocess
    import time

    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(root=str(Path(__file__).parents[1]), tests=str(Path(__file__).parent), uri=checkpoints["a"]))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        group = int(parent.stdout.readline())  # the guard: it leads the server's process group
        assert alive(group)
        parent.kill()
        parent.wait()
        deadline = time.time() + 30
        while time.time() < deadline and _group_alive(group):
            time.sleep(0.2)
        assert not _group_alive(group), "the server outlived the process that started it"
    finally:
        if parent.poll() is None:
            parent.kill()


# --- lora mode: one base server, each iteration an adapter loaded at run time ----------


def adapter_checkpoint(root: Path, name: str, base_uri: str, base_digest: str) -> str:
    """A checkpoint that carries an adapter on ``base_uri``, as IPR iterations trained with LoRA do."""
    import json

    d = root / "src" / name
    (d / "adapter").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(name.encode())
    (d / "weights.txt").write_text(f"merged-{name}")
    (d / "adapter" / "adapter_model.safetensors").write_bytes(name.encode())
    (d / "adapter" / "weights.txt").write_text(f"adapter-{name}")
    (d / "adapter" / "ipr_base.json").write_text(json.dumps({"uri": base_uri, "digest": base_digest}))
    store.write_checkpoint(str(root / "store" / name), d)
    return str(root / "store" / name)


@pytest.fixture
def adapters(tmp_path, checkpoints):
    """Two checkpoints (a1, a2) with an adapter on checkpoint a."""
    return {name: adapter_checkpoint(tmp_path, name, checkpoints["a"], store.digest(checkpoints["a"])) for name in ("a1", "a2")}


def test_lora_serves_every_iteration_as_an_adapter_of_one_base_server(checkpoints, adapters):
    cfg = model_cfg("lora", max_servers=1)
    base = served_name(store.digest(checkpoints["a"]))
    with servers(cfg) as pool:
        scorer, release = connect(cfg, checkpoints["a"])  # no adapter: the checkpoint itself, on a LoRA-enabled server
        release()
        assert scorer.model == base and scorer.identity["how"] == "started" and reply(cfg, scorer).endswith("weights-a-7")
        argv = pool.servers[0].proc.args
        assert argv[argv.index("--max-lora-rank") + 1] == "64" and "--enable-lora" in argv
        first, release = connect(cfg, adapters["a1"])
        ident = first.identity
        assert ident["pid"] == scorer.identity["pid"] and ident["how"] == "reused" and ident["adapter"] == "loaded"
        assert first.model == ident["served_model"] == served_name(store.digest(adapters["a1"])) and ident["checkpoint_digest"] == store.digest(adapters["a1"])
        assert ident["parent"] == ident["base_model"] == base and ident["root"] == str(store.read_checkpoint(adapters["a1"]) / "adapter")
        assert reply(cfg, first).endswith("weights-a+adapter-a1-7") and reply(cfg, scorer).endswith("weights-a-7")  # selected per request
        release()
        again, release = connect(cfg, adapters["a1"])
        assert again.identity["adapter"] == "reused"
        release()
        second, release = connect(cfg, adapters["a2"])
        assert second.identity["pid"] == scorer.identity["pid"] and reply(cfg, second).endswith("weights-a+adapter-a2-7")
        release()
        os.killpg(scorer.identity["pid"], 9)  # a dead server: started again, the adapter loaded again
        pool.servers[0].proc.wait()
        revived, release = connect(cfg, adapters["a2"])
        assert revived.identity["pid"] != scorer.identity["pid"] and revived.identity["adapter"] == "loaded"
        assert reply(cfg, revived).endswith("weights-a+adapter-a2-7")
        release()


def test_lora_refuses_an_adapter_whose_base_changed_or_is_gone(checkpoints, tmp_path):
    moved = adapter_checkpoint(tmp_path, "x1", checkpoints["b"], store.digest(checkpoints["a"]))  # b is not what it was trained on
    gone = adapter_checkpoint(tmp_path, "x2", str(tmp_path / "store" / "nowhere"), store.digest(checkpoints["a"]))
    cfg = model_cfg("lora", max_servers=1)
    with servers(cfg) as pool:
        with pytest.raises(ServerError, match=r"the base its LoRA adapter applies to, .*/b, now holds"):
            connect(cfg, moved)
        with pytest.raises(ServerError, match=r"/nowhere, is gone"):
            connect(cfg, gone)
        assert not pool.servers  # refused before any server started


def test_lora_mode_is_checked_against_the_training_before_work_starts(tmp_path):
    from ipr_core.config import load_config
    from ipr_core.pipeline import _lora_serving

    base = {"model": {"backend": "openai", "server": {"mode": "lora"}}, "pipeline": {"iterations": 3}}
    with pytest.raises(ConfigError, match=r"model\.server\.mode=lora needs training\.ipr\.lora=true"):
        _lora_serving(load_config(base=base))
    with pytest.raises(ConfigError, match=r"model\.server\.max_lora_rank=32 is below the last iteration's adapter rank 48"):
        _lora_serving(load_config(base={**base, "training": {"ipr": {"lora": True, "lora_r": 16}}}, overrides=["model.server.max_lora_rank=32"]))
    with pytest.raises(ConfigError, match=r"needs model\.backend=openai"):
        _lora_serving(load_config(base={**base, "model": {"server": {"mode": "lora"}}, "training": {"ipr": {"lora": True}}}))
    _lora_serving(load_config(base={**base, "training": {"ipr": {"lora": True, "lora_r": 16}}}))  # 3 x 16 <= 64
