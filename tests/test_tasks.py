"""Stage-task behaviour on a real (in-process) Prefect API: cross-run caching,
transient-only retries, recomputation of a deleted artifact, task runners."""

from __future__ import annotations


import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from helpers import pair_row
from ipr_core import store
from ipr_core.config import load_config
from ipr_core.envs.base import EnvError
from ipr_core.schemas import from_rows
from tasks.common import configure, is_transient, stage_cfg, stage_task


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=180):
        yield


CALLS: list[str] = []


@stage_task("write-pairs")
def write_pairs(cfg: dict, n: int, out: str) -> str:
    CALLS.append(out)
    store.write_dataset(out, from_rows([pair_row(i) for i in range(n)], "pairs"), "pairs")
    return out


@stage_task("read-pairs")
def count_pairs(cfg: dict, pairs_uri: str, out: str) -> str:
    CALLS.append(out)
    store.write_dataset(out, from_rows([{"name": "rows", "value": float(store.read_dataset(pairs_uri).num_rows), "step": 0}], "metrics"), "metrics", inputs=[pairs_uri])
    return out


def _stages(cfg):
    from flows.ipr_pipeline import _Stages

    return _Stages(cfg)


def test_cache_across_runs_and_deleted_artifact(tmp_path, monkeypatch):
    import flows.ipr_pipeline as fp

    monkeypatch.setitem(fp.SECTIONS, "test", ("env",))
    cfg = load_config(overrides=[f"storage.root={tmp_path}", "pipeline.retries=0"])
    a, b = str(tmp_path / "a"), str(tmp_path / "b")

    @flow
    def two(n: int):
        st = _stages(cfg)
        up = st.run(write_pairs, "test", a, n=n)
        return st.run(count_pairs, "test", b, pairs_uri=up)

    CALLS.clear()
    two(3)
    two(3)  # a second flow run: everything cached
    assert CALLS == [a, b]
    two(4)  # a changed input recomputes that stage, and the one reading it (new digest)
    assert CALLS == [a, b, a, b]
    store._fs(a)[0].rm(store.join(a, store.MANIFEST))  # artifact gone behind the cache record
    two(4)
    assert CALLS == [a, b, a, b, a]  # same content again: the reader stays cached
    assert store.read_dataset(b).column("value").to_pylist() == [4.0]


def test_transient_errors_retry_then_succeed(tmp_path):
    attempts = []

    @stage_task("flaky")
    def flaky(cfg: dict, out: str) -> str:
        attempts.append(1)
        if len(attempts) <= 2:
            raise EnvError("environment crashed")
        return out

    cfg = load_config(overrides=["pipeline.retries=2", "pipeline.retry_delay_s=0"])

    @flow
    def f():
        return configure(flaky, cfg, tmp_path).with_options(cache_policy=None, persist_result=False)(cfg=stage_cfg(cfg), out="x")

    assert f() == "x" and len(attempts) == 3


def test_algorithmic_errors_fail_fast(tmp_path):
    attempts = []

    @stage_task("buggy")
    def buggy(cfg: dict, out: str) -> str:
        attempts.append(1)
        raise ValueError("pair rule violated")

    cfg = load_config(overrides=["pipeline.retries=3", "pipeline.retry_delay_s=0"])

    @flow
    def f():
        return configure(buggy, cfg, tmp_path).with_options(cache_policy=None, persist_result=False)(cfg=stage_cfg(cfg), out="x")

    with pytest.raises(ValueError, match="pair rule"):
        f()
    assert len(attempts) == 1


def test_transient_classification():
    assert is_transient(EnvError("x")) and is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(ValueError()) and not is_transient(FileNotFoundError()) and not is_transient(store.ArtifactNotFound("x"))


def test_stage_cfg_keeps_only_its_sections():
    cfg = load_config(overrides=["training.ipr.lr=0.5", "env.train_tasks=7", "seed=9"])
    sub = stage_cfg(cfg, "env", "training.sft.expert_episodes_multiplier")
    assert sub["env"]["train_tasks"] == 7 and sub["seed"] == 9
    assert sub["training"]["ipr"]["lr"] == load_config().training.ipr.lr  # unrelated: default
    assert stage_cfg(cfg, "env") == stage_cfg(load_config(overrides=["env.train_tasks=7", "seed=9", "training.ipr.lr=0.9"]), "env")


def test_task_runners_from_config():
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.ipr_pipeline import task_runner

    assert isinstance(task_runner(load_config()), ThreadPoolTaskRunner)
    prefect_dask = pytest.importorskip("prefect_dask")
    r = task_runner(load_config(overrides=["pipeline.task_runner=dask", "pipeline.dask_address=tcp://127.0.0.1:8786"]))
    assert isinstance(r, prefect_dask.DaskTaskRunner)


@pytest.mark.parametrize("workers", [1, 2])
def test_stage_task_runner_leaves_no_idle_task_thread(workers):
    """One worker: tasks run in the flow's own thread (as the direct stage calls
    do); more: each task on a thread that ends with it, at most ``workers`` at
    once. Either way futures, dependencies and failures behave as with
    Prefect's thread pool (flows/task_runners.py says why)."""
    import threading
    import time

    from prefect import task

    from flows.ipr_pipeline import task_runner

    seen: list[threading.Thread] = []
    running, peak = [0], [0]
    lock = threading.Lock()

    @task(cache_policy=None, persist_result=False)
    def produce(x: int) -> int:
        with lock:
            seen.append(threading.current_thread())
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return x

    @task(cache_policy=None, persist_result=False)
    def consume(x: int) -> int:
        seen.append(threading.current_thread())
        if x == 2:
            raise ValueError("bad shard")
        return 10 * x

    cfg = load_config(overrides=[f"pipeline.max_workers={workers}"])

    @flow(task_runner=task_runner(cfg))
    def f():
        ps = [produce.submit(i) for i in range(4)]
        cs = [consume.submit(p) for p in ps]  # each waits on its producer's future
        out = [c.result() for c in cs[:2]] + [cs[3].result()]
        with pytest.raises(ValueError, match="bad shard"):
            cs[2].result()
        if workers > 1:  # while the flow still runs: no idle worker thread (it would keep torch's OpenMP team)
            for t in seen:
                t.join(timeout=5)
            assert not any(t.is_alive() for t in seen)
        return out, threading.current_thread()

    out, flow_thread = f()
    assert out == [0, 10, 30] and len(seen) == 8
    if workers == 1:
        assert all(t is flow_thread for t in seen)
    else:
        assert flow_thread not in seen and 1 < peak[0] <= workers


def test_dask_runner_runs_a_stage(tmp_path):
    pytest.importorskip("prefect_dask")
    from flows.ipr_pipeline import task_runner

    cfg = load_config(overrides=["pipeline.task_runner=dask", "pipeline.max_workers=1", f"storage.root={tmp_path}"])

    @stage_task("square")
    def square(cfg: dict, x: int, out: str) -> int:
        return x * x

    @flow(task_runner=task_runner(cfg))
    def f():
        return [square.with_options(cache_policy=None, persist_result=False).submit(cfg={}, x=i, out="-").result() for i in range(3)]

    assert f() == [0, 1, 4]



def test_non_retryable_http_errors_are_not_transient():
    from ipr_core.policies.base import PolicyError

    class Auth(PolicyError):
        retryable = False

    assert is_transient(PolicyError("503")) and not is_transient(Auth("401 from http://127.0.0.1"))
