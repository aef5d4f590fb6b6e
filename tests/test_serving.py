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
