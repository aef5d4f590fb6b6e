"""The thread task runner the pipeline uses: no idle thread keeps torch's OpenMP team.

Why: torch's CPU kernels run on OpenMP (libgomp), and every OS thread that
calls into torch gets its own OpenMP team of ``torch.get_num_threads()``
threads, which lives as long as that thread. Prefect's ``ThreadPoolTaskRunner``
keeps its worker threads until the flow run ends, so the parent flow's idle
workers keep their teams while the ``ipr-iteration`` subflow's new workers
build theirs (and a caller that used torch on its own thread, like the
benchmark's direct baseline, keeps one too). With a second team alive, the
tiny, many-small-op models of this pipeline ran markedly slower per stage
(most likely because libgomp stops spin-waiting once its threads outnumber the
cores, and parks and wakes them in the kernel around every small parallel op;
OMP_WAIT_POLICY=ACTIVE is no cure, the idle team then spins on a core).
Measured by bench/orchestration.py; figures in docs/performance.md.

So, with the same Prefect semantics (futures, retries, caching, states):
- ``max_workers == 1``: a task runs in the thread that submits it (the flow's
  thread), as the direct, Prefect-less calls do: one OpenMP team for the whole
  run, and no handoff between threads. With one worker the thread pool runs
  tasks one at a time in submission order anyway, and so does this.
- ``max_workers > 1``: every task gets a fresh thread that ends with the task
  (at most ``max_workers`` at once, started in submission order), so an idle
  thread never holds an OpenMP team. Shards that run side by side still share
  the cores' OpenMP threads, so on few cores more workers can be slower than
  one (bench/orchestration.py with ``--set pipeline.max_workers=2``; figures
  in docs/performance.md).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from typing import Any, Callable

from prefect.task_runners import ThreadPoolTaskRunner


class _InlineExecutor(concurrent.futures.Executor):
    """Runs each call at once in the submitting thread; returns a done future."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()
        try:
            fut.set_result(fn(*args, **kwargs))
        except Exception as e:  # handed to the future, as a pool does; Ctrl-C and termination propagate at once
            fut.set_exception(e)
        return fut


class _ThreadPerTaskExecutor(concurrent.futures.Executor):
    """At most ``max_workers`` calls at once, FIFO, each on a thread that exits after it.

    FIFO like ``ThreadPoolExecutor``: a task waiting on an earlier task's future
    (agent MC on its explore shard) never holds a slot the earlier one needs.
    """

    def __init__(self, max_workers: int):
        self._max = max_workers
        self._lock = threading.Lock()
        self._pending: collections.deque = collections.deque()
        self._running = 0
        self._threads: set[threading.Thread] = set()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._pending.append((fut, fn, args, kwargs))
            self._start_locked()
        return fut

    def _start_locked(self) -> None:
        while self._running < self._max and self._pending:
            item = self._pending.popleft()
            self._running += 1
            t = threading.Thread(target=self._run, args=(item,), name="ipr-task", daemon=True)
            self._threads.add(t)
            t.start()

    def _run(self, item) -> None:
        fut, fn, args, kwargs = item
        try:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001
                    fut.set_exception(e)
        finally:
            with self._lock:
                self._running -= 1
                self._threads.discard(threading.current_thread())
                self._start_locked()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            with self._lock:
                while self._pending:
                    self._pending.popleft()[0].cancel()
        if wait:
            while True:
                with self._lock:
                    threads = [t for t in self._threads if t is not threading.current_thread()]
                if not threads:
                    return
                for t in threads:
                    t.join()


class StageTaskRunner(ThreadPoolTaskRunner):
    """``ThreadPoolTaskRunner`` (same futures, states, cancellation) with the
    executor above: inline for one worker, a fresh thread per task otherwise."""

    def __enter__(self):
        super().__enter__()
        self._executor.shutdown(wait=False)  # the parent's pool: never used, holds no thread yet
        self._executor = _InlineExecutor() if self._max_workers <= 1 else _ThreadPerTaskExecutor(self._max_workers)
        return self
