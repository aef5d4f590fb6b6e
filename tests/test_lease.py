"""Runs that cannot trample each other: a lease on the run folder.

- unit: one holder at a time (local disk and an object store), a live holder
  is named and never taken, a dead one only with take_over, heartbeats refresh;
- end to end: a second `ipr run` on the folder of a running one is refused at
  once, naming the holder; after a SIGKILL of the first, `ipr resume` is refused
  until `--take-over`, which completes the run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY_RUN, wait_for
from ipr_core import lease, store
from prefect_fixtures import prefect_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
IPR = [sys.executable, "-m", "ipr_cli.main"]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("where", ["local", "memory"])
def test_one_holder_at_a_time(tmp_path, where):
    folder = str(tmp_path / "run") if where == "local" else f"memory://leases-{os.getpid()}/run"
    with lease.Lease(folder) as held:
        h = lease.current(folder)
        assert h.holder == held.me.holder and h.pid == os.getpid() and h.host == socket.gethostname()
        with pytest.raises(lease.LeaseHeld, match=rf"in use by another run \({socket.gethostname()} pid {os.getpid()} since"):
            lease.Lease(folder).acquire()
        with pytest.raises(lease.LeaseHeld):
            lease.Lease(folder, take_over=True).acquire()  # a live holder is never taken
    assert lease.current(folder) is None  # released


def test_a_dead_holder_is_taken_over_only_when_asked(tmp_path):
    folder = str(tmp_path / "run")
    gone = lease.Holder("old", socket.gethostname(), _dead_pid(), time.time() - 60, time.time() - 60)
    store.write_bytes(store.join(folder, lease.LEASE), json.dumps(gone.__dict__).encode())
    with pytest.raises(lease.LeaseHeld, match="held by a run that is gone .*--take-over"):
        lease.check_free(folder)
    with lease.Lease(folder, take_over=True) as held:
        assert lease.current(folder).holder == held.me.holder
    # another host's holder is judged by its heartbeat
    far = lease.Holder("far", "elsewhere", 1, time.time(), time.time())
    assert lease.alive(far) and not lease.alive(far, now=time.time() + lease.STALE_S + 1)


def test_the_heartbeat_refreshes_and_stops_when_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    folder = str(tmp_path / "run")
    with lease.Lease(folder) as held:
        first = lease.current(folder).heartbeat
        deadline = time.time() + 10
        while lease.current(folder).heartbeat == first:
            assert time.time() < deadline, "no heartbeat"
            time.sleep(0.02)
        assert lease.current(folder).holder == held.me.holder


_CONTENDER = """
import os, sys, time
from ipr_core import lease
folder, sync, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.time() + 90
def count(prefix):
    return sum(f.startswith(prefix) for f in os.listdir(sync))
def wait_for(prefix, k):
    while count(prefix) < k and time.time() < deadline:
        time.sleep(0.001)
# A barrier, not a start time: on a loaded machine one interpreter may take
# seconds longer to start, and would then ask after the winner had released.
open(os.path.join(sync, f"ready-{os.getpid()}"), "w").close()
wait_for("ready-", n)  # every contender asks at the same moment
try:
    with lease.Lease(folder):
        print("won", flush=True)
        wait_for("done-", n - 1)  # hold it until every other contender has been refused
except lease.LeaseHeld as e:
    print("refused:", e, flush=True)
    open(os.path.join(sync, f"done-{os.getpid()}"), "w").close()
"""


def _contend(folder: str, n: int, sync: Path) -> list[str]:
    sync.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", _CONTENDER, folder, str(sync), str(n)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(n)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    return [o[0].strip() for o in outs]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_runs_that_start_at_the_same_instant_get_one_lease(tmp_path, request, where):
    """Of processes asking for one folder's lease at the very same moment, exactly
    one wins (local: O_EXCL; S3: a conditional PUT on a real S3 API), and every
    other is refused naming a holder."""
    folder = str(tmp_path / "run") if where == "local" else store.join(request.getfixturevalue("s3_root"), "race")
    results = _contend(folder, 6, tmp_path / "sync")
    assert sum(r == "won" for r in results) == 1, results
    assert all(r.startswith("refused:") and ("in use by another run" in r or "at the same moment" in r) for r in results if r != "won"), results
    assert lease.current(folder) is None  # the winner released it


@pytest.mark.slow
def test_two_runs_on_one_folder_and_a_take_over(prefect_server, tmp_path):  # noqa: F811
    _, env = prefect_server
    root = tmp_path / "artifacts"
    args = ["run", "--set", f"storage.root={root}", "--set", "run_name=shared", *[x for o in TINY_RUN for x in ("--set", o)]]
    first = subprocess.Popen(IPR + args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run = root / "shared"
    wait_for(first, (run / "sft" / "model" / store.MANIFEST).exists, "the first run's SFT")

    # a second run on the same folder is refused at once, naming the holder; nothing of it is written
    config_before = (run / "config.json").read_bytes()
    second = subprocess.run(IPR + args + ["--set", "training.ipr.lr=0.5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    line = second.stderr.strip().splitlines()[0]
    assert line.startswith("ipr: error:") and f"{run} is in use by another run" in line and f"pid {first.pid}" in line, second.stderr
    assert (run / "config.json").read_bytes() == config_before  # refused before it saved its (changed) config
    status = subprocess.run(IPR + ["status", str(run), "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(status.stdout)["state"] == "running"

    # the holder dies: its lease stays, resume is refused until --take-over
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    refused = subprocess.run(IPR + ["resume", str(run)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--take-over" in refused.stderr.strip().splitlines()[0], refused.stderr[-2000:]
    taken = subprocess.run(IPR + ["resume", str(run), "--take-over"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert taken.returncode == 0, taken.stderr[-4000:]
    assert lease.current(str(run)) is None and store.exists(str(run / "iter-01" / "model"))
    done = subprocess.run(IPR + ["status", str(run), "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["state"] == "complete"
