"""A lease on a run (or experiment) folder: one writer at a time.

The lease is ``{folder}/_LEASE.json``: who holds it (a random holder id, host,
PID), since when, and a heartbeat refreshed while the holder works. Taking it
is atomic where the store allows: an exclusive create on local disk; on an
object store, a conditional create (S3: If-None-Match) followed, after a
short settle, by a read-back that must return our holder id. The read-back
covers stores whose exclusive create is not atomic under concurrent requests
(moto's threaded server is one): the last writer wins, and the loser sees it
and backs off. A second run on
the same folder is refused with the holder named. A lease whose holder is
gone (its PID is dead on this host, or its heartbeat is older than
``STALE_S`` elsewhere) is stale: it is taken over only when asked
(``--take-over``), since a run whose host is merely slow looks the same.
"""

from __future__ import annotations

import contextvars
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from ipr_core import store

LEASE = "_LEASE.json"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # a heartbeat older than this (other hosts) marks the holder gone
SETTLE_S = 0.5  # object stores: wait this long after a write before reading back who won


class LeaseHeld(store.StoreError):
    """The folder is held by another run (alive, or stale and not taken over)."""


@dataclass(frozen=True)
class Holder:
    holder: str
    host: str
    pid: int
    started: float
    heartbeat: float

    def describe(self) -> str:
        return f"{self.host} pid {self.pid} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def alive(h: Holder, now: float | None = None) -> bool:
    """Whether the holder still works: its PID on this host, its heartbeat elsewhere."""
    if h.host == socket.gethostname():
        return _pid_alive(h.pid)
    return (now or time.time()) - h.heartbeat < STALE_S


def current(folder: str) -> Holder | None:
    """The lease on ``folder``, or None; a damaged lease file counts as no lease."""
    try:
        return Holder(**json.loads(store.read_bytes(store.join(folder, LEASE))))
    except (store.ArtifactNotFound, FileNotFoundError, ValueError, TypeError):
        return None


def check_free(folder: str, take_over: bool = False) -> None:
    """Raise LeaseHeld unless ``folder`` could be leased now (nothing is written)."""
    h = current(folder)
    if h is None:
        return
    if alive(h):
        raise LeaseHeld(f"{folder} is in use by another run ({h.describe()}): wait for it to finish, or use another run name")
    if not take_over:
        raise LeaseHeld(f"{folder} is held by a run that is gone ({h.describe()}, last heartbeat {time.time() - h.heartbeat:.0f} s ago): rerun with --take-over to take it")


class Lease:
    """Hold ``folder`` for a block: ``with Lease(run, take_over=...):``."""

    def __init__(self, folder: str, take_over: bool = False):
        self.folder, self.take_over, self.uri = folder, take_over, store.join(folder, LEASE)
        now = time.time()
        self.me = Holder(uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _write(self, heartbeat: float) -> None:
        store.write_bytes(self.uri, json.dumps(asdict(Holder(**{**asdict(self.me), "heartbeat": heartbeat}))).encode())

    def acquire(self) -> "Lease":
        check_free(self.folder, self.take_over)
        if current(self.folder) is None:
            self._create()
        else:  # a dead holder's lease, taken over (check_free allowed it): overwrite, then see who won
            self._write(self.me.heartbeat)
            time.sleep(SETTLE_S)
        h = current(self.folder)
        if h is None or h.holder != self.me.holder:
            raise LeaseHeld(f"{self.folder} was taken by another run at the same moment ({h.describe() if h else 'unknown'})")
        # The heartbeat writes with the store options in force here (timeouts, retries).
        self._beat = threading.Thread(target=contextvars.copy_context().run, args=(self._heartbeat,), name="ipr-lease-heartbeat", daemon=True)
        self._beat.start()
        return self

    def _create(self) -> None:
        """Write the lease only if none exists: of runs starting at the same instant,
        exactly one wins (local: O_EXCL; S3: a conditional PUT, If-None-Match: *;
        other fsspec stores: their exclusive mode, atomic where they support it)."""
        fs, path = store._fs(self.uri)
        data = json.dumps(asdict(self.me)).encode()
        try:
            if store._is_local(fs):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            else:
                fs.pipe_file(path, data, mode="create")
                time.sleep(SETTLE_S)  # let a racing writer's create land before acquire() reads back
        except FileExistsError:
            for _ in range(10):  # the winner's file may be mid-write for a moment
                check_free(self.folder, False)  # raises, naming the winner
                time.sleep(0.2)
            if not self.take_over:
                raise LeaseHeld(f"{self.uri} exists but cannot be read: if no run uses {self.folder}, rerun with --take-over") from None
            self._write(self.me.heartbeat)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            h = current(self.folder)
            if h is None or h.holder != self.me.holder:
                return  # taken over: stop claiming it
            self._write(time.time())

    def release(self) -> None:
        self._stop.set()
        h = current(self.folder)
        if h is not None and h.holder == self.me.holder:
            fs, path = store._fs(self.uri)
            try:
                fs.rm_file(path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
