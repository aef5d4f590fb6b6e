"""The pipeline on real clusters, started here on 127.0.0.1 and stopped by PID:

- a Ray head plus a second Ray node (`ray start --head`, `ray start --address`);
- a `dask scheduler` plus two `dask worker` processes;

each running a small pipeline on moto's S3 against a real Prefect server. One
worker process is SIGKILLed while it holds an MC shard; the run still completes
(the engine re-executes the shard elsewhere) and every artifact's content
digest equals that of a threads-runner run of the same config. SFT and IPR
training run on 2 processes (torchrun from the stage, on the node that runs
it; gloo). A local storage
root with an external cluster is refused before anything runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

import yaml

from conftest import free_port
from ipr_core import store
from prefect_fixtures import prefect_server, stop_process_group  # noqa: F401
from test_pipeline import TINY, _manifests

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
IPR = [sys.executable, "-m", "ipr_cli.main"]

pytest.importorskip("minigrid")

def cluster_config(root: str, runner: dict) -> str:
    """test_pipeline's tiny config, training on 2 processes (training.processes), one
    iteration, and a fixed torch thread count: "auto" would give a cluster task the
    CPUs it asked for and the threads run the whole machine, and another thread
    count may round floats differently (docs/performance.md)."""
    cfg = yaml.safe_load(TINY.format(name="cluster", root=root))
    cfg["seed"] = 5
    cfg["training"]["processes"] = 2
    cfg["pipeline"].update(iterations=1, max_workers=2, torch_threads=1, eval_base=False, **runner)
    return yaml.safe_dump(cfg)


AWS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def _env(prefect_env: dict) -> dict:
    # the workers import this checkout's code whatever their working directory
    return {**prefect_env, **{k: os.environ[k] for k in AWS}, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
            # a token in ~/.ray (left by any earlier local Ray) would turn token auth on for the head only
            "RAY_AUTH_MODE": "disabled"}


def _run(tmp_path: Path, env: dict, root: str, runner: dict, during: Callable[[subprocess.Popen], None] | None = None) -> subprocess.CompletedProcess:
    cfg = tmp_path / f"cluster-{abs(hash(root))}.yaml"
    cfg.write_text(cluster_config(root, runner))
    log = tmp_path / f"{cfg.stem}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(IPR + ["run", "-c", str(cfg)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            if during is not None:
                during(proc)
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


def content_digests(run: str) -> dict[str, str]:
    return {k: digest for k, (digest, _) in _manifests(run).items()}


@pytest.fixture(scope="module")
def reference(prefect_server, moto_server, tmp_path_factory):  # noqa: F811
    """The same config with the threads runner: the digests a cluster run must reproduce."""
    from conftest import s3_bucket

    env = _env(prefect_server[1])
    root = s3_bucket(moto_server)
    done = _run(tmp_path_factory.mktemp("threads"), env, root, {"task_runner": "threads"})
    assert done.returncode == 0, done.stdout[-4000:]
    digests = content_digests(store.join(root, "cluster"))
    assert {"iter-01/model", "eval/test/iter-01", "iter-01/expert_rewards", "iter-01/pairs"} <= set(digests)
    for model in ("sft/model", "iter-01/model"):  # trained on 2 processes (all-reduced): the world size the trainer saw
        assert store.read_manifest(store.join(root, "cluster", model)).meta["processes"] == 2
    return digests


# --- clusters -------------------------------------------------------------------------


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait(ok: Callable[[], bool], what: str, procs: list[subprocess.Popen], timeout_s: float = 120) -> None:
    t0 = time.time()
    while not ok():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            pytest.fail(f"{what}: {dead[0].args[:3]} exited with {dead[0].returncode}")
        if time.time() - t0 > timeout_s:
            pytest.fail(f"{what} not ready in {timeout_s:.0f} s")
        time.sleep(0.5)


@contextlib.contextmanager
def ray_cluster(env: dict, logs: Path) -> Iterator[str]:
    """`ray start --head` (1 CPU) and a second node joined to it (1 CPU), both on 127.0.0.1."""
    ray = str(BIN / "ray")
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--block", "--disable-usage-stats"]
    head = _start([ray, "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}", *common], env, logs / "ray-head.log")
    procs = [head]
    try:
        import ray as ray_mod

        address = f"127.0.0.1:{port}"
        _wait(lambda: "Ray runtime started" in (logs / "ray-head.log").read_text(), "ray head", procs)
        procs.append(_start([ray, "start", f"--address={address}", *common], env, logs / "ray-node.log"))
        _wait(lambda: "Ray runtime started" in (logs / "ray-node.log").read_text(), "ray worker node", procs)
        with _ray_driver(ray_mod, address):
            _wait(lambda: len([n for n in ray_mod.nodes() if n["Alive"]]) == 2, "two live Ray nodes", procs)
        yield address
    finally:
        for p in reversed(procs):
            stop_process_group(p)
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def _ray_driver(ray_mod, address: str):
    ray_mod.init(address=address, log_to_driver=False)
    try:
        yield
    finally:
        ray_mod.shutdown()


@contextlib.contextmanager
def dask_cluster(env: dict, logs: Path) -> Iterator[str]:
    """`dask scheduler` and two `dask worker` processes (one thread, CPU=1 each) on 127.0.0.1."""
    dask = str(BIN / "dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    port = address.rsplit(":", 1)[1]
    procs = [_start([dask, "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"], env, logs / "dask-scheduler.log")]
    try:
        from distributed import Client

        _wait(lambda: "Scheduler at" in (logs / "dask-scheduler.log").read_text(), "dask scheduler", procs)
        for i in range(2):
            worker = [dask, "worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1", "--resources", "CPU=1", "--no-dashboard"]
            procs.append(_start(worker, env, logs / f"dask-worker-{i}.log"))
        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            stop_process_group(p)


# --- killing a worker while it holds a shard --------------------------------------------


def _mc_started(root: str) -> bool:
    return store.exists(store.join(root, "cluster", "iter-01", "expert_mc", "shard-000"))


def _ray_shard_worker() -> int | None:
    """A Ray worker process executing an MC shard (Ray titles it ``ray::<task name>``)."""
    import psutil

    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].startswith(("ray::expert-mc", "ray::agent-mc")):
            return p.info["pid"]
    return None


def _dask_shard_worker(address: str) -> int | None:
    """The pid of a Dask worker that is processing a task."""
    from distributed import Client

    with Client(address, timeout=30) as c:
        busy = [w for w, keys in c.processing().items() if keys]
        return c.run(os.getpid, workers=busy[:1])[busy[0]] if busy else None


def kill_a_shard_worker(root: str, find: Callable[[], int | None], killed: list[int]) -> Callable[[subprocess.Popen], None]:
    """Once MC shards run, SIGKILL one worker process that holds one (recorded in ``killed``)."""

    def during(proc: subprocess.Popen) -> None:
        t0 = time.time()
        while proc.poll() is None and time.time() - t0 < 600:
            pid = find() if _mc_started(root) else None
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.3)

    return during


# --- the tests ------------------------------------------------------------------------


@pytest.mark.slow
def test_ray_cluster_run_survives_a_killed_worker_and_matches_threads(reference, prefect_server, moto_server, tmp_path):  # noqa: F811
    pytest.importorskip("prefect_ray", reason="the ray extra (prefect-ray) is not installed")
    from conftest import s3_bucket

    env = _env(prefect_server[1])
    root, killed = s3_bucket(moto_server), []
    with ray_cluster(env, tmp_path) as address:
        done = _run(tmp_path, env, root, {"task_runner": "ray", "ray_address": address}, kill_a_shard_worker(root, _ray_shard_worker, killed))
    assert done.returncode == 0, done.stdout[-4000:]
    assert killed, "no MC shard was seen running on a Ray worker"
    assert "Using Ray cluster with 2 nodes" in done.stdout
    assert "worker died or was killed while executing a task" in done.stdout  # Ray says so, then retries the shard
    assert content_digests(store.join(root, "cluster")) == reference


@pytest.mark.slow
def test_dask_cluster_run_survives_a_killed_worker_and_matches_threads(reference, prefect_server, moto_server, tmp_path):  # noqa: F811
    pytest.importorskip("prefect_dask", reason="the dask extra (prefect-dask) is not installed")
    from conftest import s3_bucket

    env = _env(prefect_server[1])
    root, killed = s3_bucket(moto_server), []
    with dask_cluster(env, tmp_path) as address:
        done = _run(tmp_path, env, root, {"task_runner": "dask", "dask_address": address}, kill_a_shard_worker(root, lambda: _dask_shard_worker(address), killed))
        logs = "".join((tmp_path / f"dask-worker-{i}.log").read_text() for i in range(2))
    assert done.returncode == 0, done.stdout[-4000:]
    assert killed, "no Dask worker was seen processing a shard"
    assert "Connecting to an existing Dask cluster" in done.stdout
    assert "restarting" in logs.lower()  # the nanny of the killed worker started a new one
    assert content_digests(store.join(root, "cluster")) == reference


@pytest.mark.parametrize("runner", ["task_runner=ray,ray_address=127.0.0.1:1", "task_runner=dask,dask_address=tcp://127.0.0.1:1"])
def test_local_root_with_an_external_cluster_is_refused_before_anything_runs(tmp_path, runner):
    """Workers elsewhere cannot read a path on this machine: one error line naming
    storage.root and the cluster field, nothing written, no server contacted."""
    root = tmp_path / "artifacts"
    sets = [f"pipeline.{kv}" for kv in runner.split(",")]
    args = IPR + ["run", "-c", str(ROOT / "configs" / "demo.yaml"), "--set", f"storage.root={root}"]
    for s in sets:
        args += ["--set", s]
    env = {"PATH": str(BIN), "PREFECT_HOME": str(tmp_path / "prefect"), "HOME": str(tmp_path)}
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    field = sets[1].split("=")[0]
    assert lines[0].startswith("ipr: error: storage.root=") and field in lines[0] and "s3://" in lines[0] and "shared_local_root" in lines[0]
    assert not root.exists() and not (tmp_path / "prefect").exists()
