"""Data-parallel generation: one ``Policy``, N replica processes, each with its own model.

One process cannot keep a machine busy with a small model: every forward pays
a fixed cost of Python and op dispatch on one core, the tiny matmuls and the
decode attention gain little from a second intra-op thread, and two Python
threads sharing one model fight over the GIL. Separate processes do not
share a GIL: each replica answers its part of every batch on its own core (or
its own GPU: ``cuda:rank``), as vLLM's data parallelism does with engines.
On a few CPU cores the gain is modest (the cores share memory bandwidth and
caches, and each replica still pays every forward's fixed cost); the case it
is built for is one replica per GPU. Measured by bench/rollouts.py
(``--replicas 2``); figures in docs/performance.md.

Lanes (``submit`` / ``collect``, ``LanedPolicy``): one request in flight per
replica, collected as each finishes. The lock-step runner uses them to give
every replica its own cohort of episodes, so a cohort goes on as soon as its
replica answers instead of waiting for the slowest one (whichever drew the
longest reply), which beat splitting every call (figures in
docs/performance.md).

Each ``generate`` call is split by rows:
- Rows are grouped by their conversation's head (system prompt + instruction:
  the part ``conversation.window`` always keeps), and a head sticks to the
  replica that answered it last, so an episode's later turns find its earlier
  turns' KV in that replica's prefix cache, and N rollouts of one state are
  prefilled once where they land together.
- Loads stay balanced (every call waits for its slowest replica): a head keeps
  its replica while that stays within ceil(rows / replicas) plus a little
  slack; other groups go, largest first, to the least loaded replica, and a
  group larger than a fair share is split.
Texts depend only on (conversation, seed) for the transformers backend, so the
split never changes a result (to the last bits of the logits, as any batching).

Errors: an exception in a replica is raised here with the replica's traceback
attached (its own type when it pickles: a ``PolicyError`` stays retryable); a
replica that dies (killed, out of memory) raises ``PolicyError`` naming it and
its exit code, and the policy is closed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import traceback
from collections import OrderedDict
from dataclasses import fields
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

from ipr_core.policies.base import Policy, PolicyError, SamplingParams
from ipr_core.types import Message

log = logging.getLogger(__name__)

MAX_STICKY_HEADS = 1 << 16  # heads remembered for routing (LRU); a forgotten one is just placed anew


def head_key(conversation: Sequence[Message]) -> str:
    """Routing key: the system prompt and the instruction (the first two messages)."""
    return hashlib.blake2b(json.dumps(list(conversation[:2]), sort_keys=True).encode(), digest_size=16).hexdigest()


def assign_rows(keys: Sequence[str], sticky: "OrderedDict[str, int]", replicas: int) -> list[int]:
    """Replica of each row (see the module docstring); updates ``sticky``.

    Deterministic: the same keys and sticky state give the same assignment.
    """
    n = len(keys)
    cap = -(-n // replicas)
    slack = n // (8 * replicas)  # rows a sticky head may exceed the fair share by (32 rows, 2 replicas: 2)
    groups: "OrderedDict[str, list[int]]" = OrderedDict()
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    load = [0] * replicas
    out = [-1] * n

    def place(rows: list[int], r: int) -> None:
        for i in rows:
            out[i] = r
        load[r] += len(rows)

    pending = []
    for k, rows in groups.items():
        r = sticky.get(k)
        if r is not None and r < replicas and load[r] + len(rows) <= cap + slack:
            place(rows, r)
            sticky.move_to_end(k)
        else:
            pending.append((k, rows))
    for k, rows in sorted(pending, key=lambda kr: -len(kr[1])):  # largest first (stable: ties keep order)
        first = None
        while rows:
            r = min(range(replicas), key=lambda j: load[j])
            take = max(1, min(len(rows), cap - load[r]))
            place(rows[:take], r)
            rows = rows[take:]
            first = r if first is None else first
        sticky[k] = first
        sticky.move_to_end(k)
    while len(sticky) > MAX_STICKY_HEADS:
        sticky.popitem(last=False)
    return out


def _worker(build: Callable[[int], Policy], rank: int, threads: int | None, conn) -> None:
    """Replica main loop: build the policy, then answer (op, args) messages until told to close."""
    try:
        if threads:
            import torch

            torch.set_num_threads(threads)
        policy = build(rank)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", _portable(e)))
        return
    conn.send(("ok", None))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):  # the parent went away
            break
        try:
            if op == "generate":
                result: Any = policy.generate(*args)
            elif op == "stats":
                stats = getattr(policy, "stats", None)
                result = None if stats is None else {f.name: getattr(stats, f.name) for f in fields(stats)}
            elif op in ("reset_stats", "clear_prefix_cache"):
                method = getattr(policy, op, None)
                result = method() if method else None
            elif op == "close":
                policy.close()
                conn.send(("ok", None))
                break
            else:
                raise ValueError(f"unknown replica op {op!r}")
        except Exception as e:  # noqa: BLE001 - reported to the parent
            conn.send(("error", _portable(e)))
        else:
            conn.send(("ok", result))


def _portable(e: BaseException) -> tuple[BaseException | None, str]:
    """The exception (when it survives pickling) and its formatted traceback."""
    import pickle

    tb = "".join(traceback.format_exception(e))
    try:
        pickle.loads(pickle.dumps(e))
        return e, tb
    except Exception:  # noqa: BLE001
        return None, tb


class ReplicatedPolicy:
    """``Policy`` over ``replicas`` worker processes built by ``build(rank)``.

    ``build`` must pickle (a module-level function or a ``functools.partial``
    of one): workers are spawned, not forked (forking a process that already
    runs torch threads can deadlock). ``threads``: torch intra-op threads per
    replica (None leaves torch's default). Not thread-safe, like the backends.
    """

    def __init__(self, build: Callable[[int], Policy], replicas: int, *, threads: int | None = None, start_timeout_s: float = 600.0):
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.replicas = replicas
        self.threads = threads
        self._sticky: OrderedDict[str, int] = OrderedDict()
        self._busy: set[int] = set()  # lanes (replicas) with a submitted request not yet collected
        self._closed = False
        ctx = mp.get_context("spawn")
        self._conns, self._procs = [], []
        try:
            for rank in range(replicas):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(build, rank, threads, child), name=f"ipr-replica-{rank}", daemon=True)
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            self._gather(list(range(replicas)), "start", start_timeout_s)
        except BaseException:
            self._terminate()
            raise
        log.info("generation replicas: %d processes (pids %s), %s torch threads each", replicas, ", ".join(str(p.pid) for p in self._procs), threads or "default")

    # --- messaging -------------------------------------------------------------------

    def _replies(self, ranks: list[int], what: str, timeout_s: float | None = None):
        """(rank, reply or None, exception or None) for each rank, as they arrive.

        An exception is the replica's own (its traceback attached) or a
        ``PolicyError`` for a replica that died; after a death, once every rank
        has been read, the others are terminated (the caller retries with a new
        policy). No reply within ``timeout_s``: all are terminated at once.
        """
        died = False
        waiting = {self._conns[r]: r for r in ranks}
        sentinels = {self._procs[r].sentinel: r for r in ranks}
        try:
            while waiting:
                ready = wait(list(waiting) + [s for s, r in sentinels.items() if self._conns[r] in waiting], timeout_s)
                if not ready:
                    self._terminate()
                    raise PolicyError(f"generation replicas {sorted(waiting.values())} did not answer {what} within {timeout_s:g} s")
                for obj in ready:
                    if obj in waiting:
                        r = waiting.pop(obj)
                        try:
                            status, payload = obj.recv()
                        except (EOFError, OSError):
                            status, payload = "died", None
                    elif sentinels.get(obj) is not None and self._conns[sentinels[obj]] in waiting:
                        r = sentinels[obj]
                        if self._conns[r].poll():  # its last reply is still in the pipe
                            continue
                        waiting.pop(self._conns[r])
                        status, payload = "died", None
                    else:
                        continue
                    self._busy.discard(r)
                    if status == "ok":
                        yield r, payload, None
                    elif status == "error":
                        exc, tb = payload
                        if exc is None:
                            exc = PolicyError(f"generation replica {r} failed during {what}")
                        exc.add_note(f"in generation replica {r} (pid {self._procs[r].pid}):\n{tb}")
                        yield r, None, exc
                    else:
                        died = True
                        self._procs[r].join(5)
                        yield r, None, PolicyError(f"generation replica {r} (pid {self._procs[r].pid}) exited with code {self._procs[r].exitcode} during {what}")
        finally:
            if died:
                self._terminate()

    def _gather(self, ranks: list[int], what: str, timeout_s: float | None = None) -> list[Any]:
        """Each rank's reply, in order; the first failure is raised after all replied."""
        replies: dict[int, Any] = {}
        errors: list[BaseException] = []
        for r, reply, exc in self._replies(ranks, what, timeout_s):
            if exc is None:
                replies[r] = reply
            else:
                errors.append(exc)
        if errors:
            raise errors[0]
        return [replies[r] for r in ranks]

    def _send(self, rank: int, op: str, args: tuple) -> None:
        try:
            self._conns[rank].send((op, args))
        except OSError as e:  # the pipe broke: the replica is gone
            self._terminate()
            raise PolicyError(f"generation replica {rank} (pid {self._procs[rank].pid}) is gone (exit code {self._procs[rank].exitcode}): {e}") from e

    def _check_open(self, op: str, *, idle: bool = True) -> None:
        if self._closed:
            raise PolicyError(f"{op}() on a closed ReplicatedPolicy")
        if idle and self._busy:  # their replies would be read as this call's
            raise PolicyError(f"{op}() while lanes {sorted(self._busy)} have requests in flight (collect or drain them first)")

    def _call(self, op: str, args: tuple = ()) -> list[Any]:
        self._check_open(op)
        for rank in range(self.replicas):
            self._send(rank, op, args)
        return self._gather(list(range(self.replicas)), op)

    # --- Policy ----------------------------------------------------------------------

    def generate(self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams, seeds: Sequence[int]) -> list[str]:
        if len(conversations) != len(seeds):
            raise ValueError(f"{len(conversations)} conversations but {len(seeds)} seeds")
        self._check_open("generate")
        if not conversations:
            return []
        where = assign_rows([head_key(c) for c in conversations], self._sticky, self.replicas)
        rows = [[i for i, r in enumerate(where) if r == k] for k in range(self.replicas)]
        busy = [k for k in range(self.replicas) if rows[k]]
        for k in busy:
            self._send(k, "generate", ([list(conversations[i]) for i in rows[k]], sampling, [seeds[i] for i in rows[k]]))
        out: list[str] = [""] * len(conversations)
        for k, texts in zip(busy, self._gather(busy, "generate")):
            for i, text in zip(rows[k], texts):
                out[i] = text
        return out

    # --- lanes: one request in flight per replica, collected as each finishes ---------

    @property
    def lanes(self) -> int:
        """Independent request lanes (one per replica) for ``submit`` / ``collect``."""
        return self.replicas

    def submit(self, lane: int, conversations: Sequence[Sequence[Message]], sampling: SamplingParams, seeds: Sequence[int]) -> None:
        """Start a generate call on replica ``lane`` and return at once (``collect`` gets its texts).

        ``generate`` splits every call over the replicas and so waits for the
        slowest (whichever draws the longest reply); the lock-step runner
        instead keeps one cohort of episodes per lane, and a cohort goes on as
        soon as its own replica answers.
        """
        if len(conversations) != len(seeds):
            raise ValueError(f"{len(conversations)} conversations but {len(seeds)} seeds")
        if not 0 <= lane < self.replicas:
            raise ValueError(f"lane {lane} out of range: {self.replicas} lanes")
        self._check_open("submit", idle=False)
        if lane in self._busy:
            raise PolicyError(f"lane {lane} already has a request in flight")
        self._send(lane, "generate", ([list(c) for c in conversations], sampling, list(seeds)))
        self._busy.add(lane)

    def collect(self) -> tuple[int, list[str]]:
        """(lane, texts) of the first lane in flight to answer.

        A failure is raised once every lane in flight has answered (their texts
        are dropped), so the policy is idle again, as after a failed
        ``generate``; a replica that died closes the policy.
        """
        self._check_open("collect", idle=False)
        if not self._busy:
            raise PolicyError("collect() with no request in flight")
        replies = self._replies(sorted(self._busy), "generate")
        lane, texts, exc = next(replies)
        if exc is None:
            replies.close()
            return lane, texts
        rest = [e for _, _, e in replies if e is not None]
        for e in rest:
            log.warning("generation replica failed too: %s", e)
        raise exc

    def drain(self) -> None:
        """Wait for every lane in flight and drop its texts (a runner stopping early)."""
        if self._closed or not self._busy:
            return
        for lane, _, exc in self._replies(sorted(self._busy), "generate"):
            if exc is not None:
                log.warning("generation replica %d failed while being drained: %s", lane, exc)

    @property
    def stats(self):
        """The replicas' counters summed (their seconds add up across processes)."""
        from ipr_core.policies.hf import GenerationStats

        total = GenerationStats()
        for s in self._call("stats"):
            for name, value in (s or {}).items():
                setattr(total, name, getattr(total, name) + value)
        return total

    def reset_stats(self) -> None:
        self._call("reset_stats")

    def clear_prefix_cache(self) -> None:
        self._call("clear_prefix_cache")
        self._sticky.clear()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.drain()
            for rank in range(self.replicas):
                self._send(rank, "close", ())
            self._gather(list(range(self.replicas)), "close", 60.0)
        except (PolicyError, OSError) as e:
            log.warning("closing generation replicas: %s", e)
        finally:
            self._terminate(grace_s=5.0)

    def _terminate(self, grace_s: float = 0.0) -> None:
        """Stop the workers: those still running after ``grace_s`` (told to close, or not) are terminated."""
        self._closed = True
        self._busy.clear()
        for proc in self._procs:
            proc.join(grace_s)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> "ReplicatedPolicy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._terminate()


def default_threads(replicas: int) -> int:
    """Intra-op threads per replica on CPU: the cores shared out (at least one)."""
    return max(1, (os.cpu_count() or 1) // replicas)


def replica_device(device: str, rank: int) -> str:
    """``cuda`` / ``auto`` with several GPUs: one per replica (round robin); else as given."""
    import torch

    if device in ("cuda", "auto") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return f"cuda:{rank % torch.cuda.device_count()}"
    return device


def build_transformers_replica(model_path: str, kwargs: dict, rank: int) -> Policy:
    """``build`` for ``TransformersPolicy`` replicas (module level, so it pickles)."""
    from ipr_core.policies.hf import TransformersPolicy

    return TransformersPolicy(model_path, **{**kwargs, "device": replica_device(kwargs.get("device", "auto"), rank)})


__all__ = ["ReplicatedPolicy", "assign_rows", "head_key", "default_threads", "build_transformers_replica"]
