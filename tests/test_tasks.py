"""Stage-task behaviour on a real (in-process) Prefect API: cross-run caching,
transient-only retries, recomputation of a deleted artifact, task runners."""

from __future__ import annotations


import pytest
from prefect import flow, task
from prefect.testing.utilities import prefect_test_harness

from helpers import pair_row
from ipr_core import store
from ipr_core.config import load_config
from ipr_core.envs.base import EnvError
from ipr_core.schemas import from_rows
from ipr_core.pipeline import Context, Rows, UndeclaredRead, stage
from tasks.common import configure, is_transient, result_storage, stage_task


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=180):
        yield


CALLS: list[str] = []


@stage("write-pairs", path="a", kind="pairs", reads=("seed",), cost=("sampling.batch_size",))
def write_pairs(ctx: Context, n: int) -> Rows:
    CALLS.append("a")
    ctx.cfg.sampling.batch_size  # a cost-only read: allowed, not part of the identity
    return Rows([pair_row(i) for i in range(n)])


@stage("count-pairs", path="b", kind="metrics", reads=())
def count_pairs(ctx: Context, pairs_uri: str) -> Rows:
    CALLS.append("b")
    return Rows([{"name": "rows", "value": float(store.read_dataset(pairs_uri).num_rows), "step": 0}])


@stage("sloppy", path="c", kind="metrics", reads=("seed",))
def sloppy(ctx: Context) -> Rows:
    return Rows([{"name": "lr", "value": ctx.cfg.training.ipr.lr, "step": 0}])  # not declared


@stage("sharded", path="iter-{iteration:02d}/explore/shard-{shard:03d}", kind="metrics", reads=())
def sharded(ctx: Context, iteration: int, shard: int) -> Rows:
    return Rows([])


def _submit(st, cfg, out, storage, **kw):
    t = configure(stage_task(st), cfg, storage).with_options(refresh_cache=not store.exists(out))
    return t.submit(cfg=cfg.model_dump(mode="json"), out=out, inputs=kw.pop("inputs", {}), params=kw)


def _two(tmp_path, n: int, *overrides: str) -> str:
    cfg = load_config(overrides=[f"storage.root={tmp_path}", "pipeline.retries=0", *overrides])
    run = store.join(str(tmp_path), cfg.run_name)

    @flow
    def two():
        storage = result_storage(cfg)
        up = _submit(write_pairs, cfg, store.join(run, "a"), storage, n=n)
        return _submit(count_pairs, cfg, store.join(run, "b"), storage, inputs={"pairs_uri": up}).result()

    return two()


def test_cache_across_runs_and_deleted_artifact(tmp_path):
    CALLS.clear()
    b = _two(tmp_path, 3)
    _two(tmp_path, 3)  # a second flow run: everything cached
    assert CALLS == ["a", "b"]
    _two(tmp_path, 3, "sampling.batch_size=5")  # a cost-only field: still cached
    assert CALLS == ["a", "b"]
    _two(tmp_path, 4)  # a changed parameter recomputes that stage, and the one reading it (new digest)
    assert CALLS == ["a", "b", "a", "b"]
    a = store.join(str(tmp_path), "ipr-demo", "a")
    store._fs(a)[0].rm(store.join(a, store.MANIFEST))  # artifact gone behind the cache record
    _two(tmp_path, 4)
    assert CALLS == ["a", "b", "a", "b", "a"]  # same content again: the reader stays cached
    assert store.read_dataset(b).column("value").to_pylist() == [4.0]


def test_another_run_name_copies_instead_of_recomputing(tmp_path):
    CALLS.clear()
    _two(tmp_path, 3, "run_name=one")
    b = _two(tmp_path, 3, "run_name=two")  # same reads, same inputs: copied from run one
    assert CALLS == ["a", "b"]
    m = store.read_manifest(b)
    assert m.origin == f"copied from {store.join(str(tmp_path), 'one', 'b')}"
    assert m.digest == store.read_manifest(store.join(str(tmp_path), "one", "b")).digest
    assert store.read_dataset(b).column("value").to_pylist() == [3.0]
    _two(tmp_path, 3, "run_name=three", "seed=1")  # a declared read differs: computed
    assert CALLS == ["a", "b", "a"]  # ... and its reader sees the same content: copied


def test_task_run_names_say_stage_and_place(tmp_path):
    from prefect.client.orchestration import get_client

    cfg = load_config(overrides=[f"storage.root={tmp_path}", "pipeline.retries=0"])

    @flow
    def f():
        fut = _submit(sharded, cfg, str(tmp_path / "iter-02" / "explore" / "shard-003"), result_storage(cfg), iteration=2, shard=3)
        fut.wait()
        return fut.task_run_id

    with get_client(sync_client=True) as client:
        assert client.read_task_run(f()).name == "sharded[iter-02/explore/shard-003]"


def test_a_read_that_is_not_declared_fails_loudly(tmp_path):
    cfg = load_config(overrides=[f"storage.root={tmp_path}", "pipeline.retries=0"])

    @flow
    def f():
        return _submit(sloppy, cfg, str(tmp_path / "c"), result_storage(cfg)).result()

    with pytest.raises(UndeclaredRead, match="stage 'sloppy' read config field 'training.ipr.lr'"):
        f()
    assert not store.exists(str(tmp_path / "c"))


def test_transient_errors_retry_then_succeed(tmp_path):
    attempts = []

    @stage("flaky", path="x", kind="metrics", reads=())
    def flaky(ctx: Context) -> Rows:
        attempts.append(1)
        if len(attempts) <= 2:
            raise EnvError("environment crashed")
        return Rows([])

    cfg = load_config(overrides=["pipeline.retries=2", "pipeline.retry_delay_s=0", f"storage.root={tmp_path}"])
    out = str(tmp_path / "x")

    @flow
    def f():
        return configure(stage_task(flaky), cfg, tmp_path).with_options(cache_policy=None, persist_result=False)(cfg=cfg.model_dump(mode="json"), out=out, inputs={}, params={})

    assert f() == out and len(attempts) == 3


def test_algorithmic_errors_fail_fast(tmp_path):
    attempts = []

    @stage("buggy", path="x", kind="metrics", reads=())
    def buggy(ctx: Context) -> Rows:
        attempts.append(1)
        raise ValueError("pair rule violated")

    cfg = load_config(overrides=["pipeline.retries=3", "pipeline.retry_delay_s=0", f"storage.root={tmp_path}"])

    @flow
    def f():
        return configure(stage_task(buggy), cfg, tmp_path).with_options(cache_policy=None, persist_result=False)(cfg=cfg.model_dump(mode="json"), out=str(tmp_path / "x"), inputs={}, params={})

    with pytest.raises(ValueError, match="pair rule"):
        f()
    assert len(attempts) == 1


def test_transient_classification():
    assert is_transient(EnvError("x")) and is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert not is_transient(ValueError()) and not is_transient(FileNotFoundError()) and not is_transient(store.ArtifactNotFound("x"))


def test_task_runners_from_config():
    from prefect.task_runners import ThreadPoolTaskRunner

    from flows.clusters import task_runner

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

    from flows.clusters import task_runner

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
    from flows.clusters import task_runner

    cfg = load_config(overrides=["pipeline.task_runner=dask", "pipeline.max_workers=1", f"storage.root={tmp_path}"])

    @stage("square", path="sq-{x}", kind="metrics", reads=())
    def square(ctx: Context, x: int) -> Rows:
        return Rows([{"name": "square", "value": float(x * x), "step": x}])

    t = stage_task(square).with_options(cache_policy=None, persist_result=False)

    @task(persist_result=False)
    def worker_api() -> str | None:
        import os

        return os.environ.get("PREFECT_API_URL")

    @flow(task_runner=task_runner(cfg))
    def f():
        from flows.clusters import api_url

        outs = [t.submit(cfg=cfg.model_dump(mode="json"), out=str(tmp_path / f"sq-{i}"), inputs={}, params={"x": i}).result() for i in range(3)]
        return outs, worker_api.submit().result(), api_url()

    outs, worker, ours = f()
    assert [store.read_rows(u)[0]["value"] for u in outs] == [0.0, 1.0, 4.0]
    # the LocalCluster's worker reports to this flow's API (an ephemeral one too), not to an API of its own
    assert worker and worker.rstrip("/") == ours



def test_non_retryable_http_errors_are_not_transient():
    from ipr_core.policies.base import PolicyError

    class Auth(PolicyError):
        retryable = False

    assert is_transient(PolicyError("503")) and not is_transient(Auth("401 from http://127.0.0.1"))
