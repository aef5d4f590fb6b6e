"""What a stage used: the process's peak resident memory while it ran, and the
thread settings it ran with. The runner records both in the stage's manifest
(``timings.peak_rss_mb``, ``timings.torch_threads`` ...), the iteration table
shows the peak.

The peak is the process's, sampled while the stage runs: stages that run side
by side in one process (thread task runner) see each other's memory.

Also the process's shared pools (``shared_pool``): stages that run side by side
draw their environment threads from one pool instead of each starting its own.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

_T = TypeVar("_T")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """The process's resident memory now (Linux /proc), or None where unknown."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class PeakRSS:
    """``with PeakRSS() as p: ...``; then ``p.peak_mb``: the highest resident
    memory sampled every ``interval_s`` while the block ran (where /proc is
    missing, the process's lifetime peak from getrusage)."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        now = rss_bytes()
        if now is not None:
            self.peak = max(self.peak, now)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "PeakRSS":
        self._sample()
        if rss_bytes() is not None:
            self._thread = threading.Thread(target=self._loop, name="ipr-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._sample()
        else:  # ru_maxrss: KiB on Linux, bytes on macOS; the lifetime peak, an upper bound
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak = rss if rss > 1 << 32 else rss * 1024

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def cores() -> int:
    """The cores this process may run on (its CPU affinity mask, else the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_settings() -> dict[str, Any]:
    """Torch's intra-op and inter-op threads, the cores allowed, OpenMP's wait policy and spin count, and glibc's mmap threshold."""
    out: dict[str, Any] = {"cores": cores(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "")}
    out["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
    torch = sys.modules.get("torch")  # not imported for this: a stage that never used torch has no torch threads
    if torch is not None:
        out.update(torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads())
    return out


def stage_threads(setting: int | str | None, *, max_workers: int, local: bool) -> int | None:
    """What ``pipeline.torch_threads`` means here: a count as given; ``"auto"``:
    this process's cores shared among the ``max_workers`` stages that run at
    once on this machine (``local``); on an external cluster's worker, the CPUs
    the engine gave the task (Ray sets ``OMP_NUM_THREADS`` to a task's
    ``num_cpus``), else the worker's cores; None: torch's default."""
    if setting == "auto":
        if not local and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            return max(1, int(os.environ["OMP_NUM_THREADS"]))
        return max(1, cores() // (max_workers if local else 1))
    return setting  # type: ignore[return-value]


def set_torch_threads(n: int | None) -> None:
    """Torch's intra-op threads for this process (None: leave torch's default)."""
    if n is not None:
        import torch

        torch.set_num_threads(n)


_PROCESS_WIDE: dict[tuple, Any] = {}
_KEY_LOCKS: dict[tuple, threading.Lock] = {}
_KEY_LOCKS_LOCK = threading.Lock()


def process_wide(key: tuple, make: Callable[[], _T]) -> _T:
    """The process's one object for ``key``, made by ``make()`` on first use and
    kept for the process's life: what stages that run at once in one process
    must share (the prefix-cache budget, the environment threads), although
    each builds its own policy and runner.

    ``make()`` runs under a lock of ``key``'s own: a slow ``make`` (a disk scan,
    an expert game) holds up only the callers of the same key, and a ``make``
    may itself ask for other keys."""
    if key in _PROCESS_WIDE:
        return _PROCESS_WIDE[key]
    with _KEY_LOCKS_LOCK:
        lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with lock:
        if key not in _PROCESS_WIDE:
            _PROCESS_WIDE[key] = make()
        return _PROCESS_WIDE[key]


def shared_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's pool ``name`` of ``workers`` threads: two stages that run at
    once with ``env.workers=4`` step their environments on 4 threads, not 8.
    Work items must not wait on other items of the same pool."""
    return process_wide(("pool", name, workers), lambda: ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name))


# glibc keeps freed memory for reuse instead of returning it: its mmap threshold
# rises to the largest block freed (up to 32 MB), so a training step's
# activation tensors, once freed, stay resident as heap that later stages
# never shrink. A fixed threshold returns them. Not too low: every block above
# it is a fresh mapping whose pages fault in zeroed, and at 128 KB a training
# step's megabyte-sized activations made the demo's SFT take twice as long.
# 8 MB keeps most of the speed and the memory (docs/performance.md).
MALLOC_THRESHOLD = 8 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def return_freed_memory() -> bool:
    """Blocks over ``MALLOC_THRESHOLD`` are mapped and unmapped on their own and
    the heap is trimmed past it, so freed tensors leave the resident set. Set
    for this process (glibc's ``mallopt``) and, through glibc's environment
    variables, for its children; a value the user gave in the environment
    (either variable, or ``GLIBC_TUNABLES``) wins. False where not glibc."""
    if any(k in os.environ for k in (*_MALLOC_ENV, "GLIBC_TUNABLES")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, MALLOC_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        for k in _MALLOC_ENV:
            os.environ[k] = str(MALLOC_THRESHOLD)
    return ok
