"""Schedules on a real Prefect server: the scheduler creates the runs, a worker runs one.

tests/test_deploy.py starts its run by hand (`prefect deployment run`), so it
cannot see a broken scheduler. Here nothing is started by hand: the server's
scheduler service must create the scheduled flow runs itself (it did not with
SQLAlchemy 2.1 under prefect 3.8: "Can't evaluate bulk DML statement", see
pyproject.toml), and a process worker of its own pool completes the first one.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from helpers import TINY_DEPLOY
from prefect_fixtures import VENV_BIN, prefect_server_fast_scheduler, stop_process_group  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]

POOL = "sched-cpu"  # the worker's own pool: nothing else is deployed on it
LEAD_S = 30  # the tiny deployment's first run is due this long after it is written
INTERVAL_S = 300  # ... and the next ones every 5 min: only the first is due during the test


def _prefect(args, env, timeout=300):
    out = subprocess.run([str(VENV_BIN / "prefect"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def _api(api: str, path: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(api + path, data=data, headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


def _when(ts: str) -> datetime:
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


def _runs(api: str, deployment_id: str) -> list[dict]:
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC", "limit": 200}
    return _api(api, "/flow_runs/filter", body)


def _server_log(env: dict) -> str:
    return (Path(env["PREFECT_HOME"]) / "server.log").read_text(errors="replace")


def _scheduled_runs(api: str, env: dict, deployment_id: str, min_runs: int = 3, timeout_s: float = 90) -> list[dict]:
    """Poll until the server's scheduler has created ``min_runs`` scheduled runs of the deployment."""
    deadline = time.time() + timeout_s
    while True:
        runs = [r for r in _runs(api, deployment_id) if r["state"]["type"] == "SCHEDULED" and r["auto_scheduled"]]
        if len(runs) >= min_runs:
            return runs
        if time.time() > deadline:
            pytest.fail(f"the scheduler created {len(runs)} scheduled runs in {timeout_s:.0f} s; server log tail:\n{_server_log(env)[-4000:]}")
        time.sleep(1)


def _next_0200_utc(t: datetime) -> datetime:
    day = t.astimezone(timezone.utc).replace(hour=2, minute=0, second=0, microsecond=0)
    return day if day > t else day + timedelta(days=1)


@pytest.fixture(scope="module")
def deployed(prefect_server_fast_scheduler, tmp_path_factory):  # noqa: F811
    """prefect.yaml deployed as is, plus a tiny interval-scheduled copy of it on POOL; no run started by hand."""
    api, env = prefect_server_fast_scheduler
    env = {**env, "IPR_FLOW_HOME": str(ROOT)}
    for pool in ("ipr-cpu", POOL):
        _prefect(["work-pool", "create", pool, "--type", "process", "--overwrite"], env)
    t_nightly = datetime.now(timezone.utc)
    _prefect(["deploy", "--all", "--no-prompt"], env)

    # The tiny deployment: the project's own prefect.yaml (pull step, entrypoint)
    # with a single deployment whose interval schedule's first run is LEAD_S ahead.
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    nightly = next(d for d in project["deployments"] if d["name"] == "nightly")
    storage = tmp_path_factory.mktemp("sched-artifacts")
    anchor = (datetime.now(timezone.utc) + timedelta(seconds=LEAD_S)).replace(microsecond=0)
    tiny = {
        "name": "tiny-interval",
        "entrypoint": nightly["entrypoint"],
        "parameters": {"config_path": nightly["parameters"]["config_path"], "overrides": [*TINY_DEPLOY, f"storage.root={storage}", "run_name=scheduled"]},
        "schedules": [{"interval": INTERVAL_S, "anchor_date": anchor.isoformat(), "timezone": "UTC", "active": True}],
        "work_pool": {"name": POOL, "work_queue_name": "default"},
    }
    spec = tmp_path_factory.mktemp("sched-spec") / "prefect.yaml"
    spec.write_text(yaml.safe_dump({**project, "deployments": [tiny]}, sort_keys=False))
    _prefect(["deploy", "--prefect-file", str(spec), "--all", "--no-prompt"], env)
    return {"api": api, "env": env, "t_nightly": t_nightly, "anchor": anchor, "storage": storage}


def test_installed_sqlalchemy_is_within_the_pin():
    """The quick check (no server): the venv has a SQLAlchemy the pin allows (2.1 breaks the scheduler)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(Requirement(d) for d in deps if Requirement(d).name.lower() == "sqlalchemy")
    assert pin.specifier.contains(version("sqlalchemy")), f"SQLAlchemy {version('sqlalchemy')} is outside {pin}: pip install '{pin}'"
    assert not pin.specifier.contains("2.1.0")


@pytest.mark.slow
def test_nightly_cron_gets_scheduled_runs(deployed):
    """The cron of prefect.yaml's `nightly` is active on the server: its next 02:00 UTC runs exist."""
    api, env = deployed["api"], deployed["env"]
    dep = _api(api, "/deployments/name/ipr-from-config/nightly")
    assert [(s["schedule"].get("cron"), s["schedule"].get("timezone"), s["active"]) for s in dep["schedules"]] == [("0 2 * * *", "UTC", True)]
    runs = _scheduled_runs(api, env, dep["id"])
    starts = [_when(r["expected_start_time"]) for r in runs]
    assert all((t.hour, t.minute, t.second) == (2, 0, 0) for t in starts), starts
    assert starts == sorted(set(starts)) and all(b - a == timedelta(days=1) for a, b in zip(starts, starts[1:])), starts
    # the first is the next 02:00 UTC (the one after, had 02:00 passed while the scheduler ran)
    first = _next_0200_utc(deployed["t_nightly"])
    assert starts[0] in (first, first + timedelta(days=1)), (starts[0], first)
    assert all(r["parameters"]["overrides"] == ["run_name=ipr-nightly"] for r in runs)
    errors = [line for line in _server_log(env).splitlines() if "ERROR" in line and "schedule_" in line]
    assert not errors, errors  # the scheduler's loops ran clean


@pytest.mark.slow
def test_worker_completes_a_run_the_scheduler_created(deployed):
    """No `prefect deployment run`: the scheduler creates the runs, `worker --run-once` completes the first."""
    pytest.importorskip("minigrid")
    api, env = deployed["api"], deployed["env"]
    dep = _api(api, "/deployments/name/ipr-from-config/tiny-interval")
    runs = _scheduled_runs(api, env, dep["id"])
    starts = [_when(r["expected_start_time"]) for r in runs]
    assert starts[0] == deployed["anchor"], f"first scheduled run at {starts[0]}, expected the anchor {deployed['anchor']} (scheduled too late?)"
    assert all(b - a == timedelta(seconds=INTERVAL_S) for a, b in zip(starts, starts[1:])), starts
    first = runs[0]

    # A worker polls for runs due within its prefetch window (10 s): start it shortly before
    # the first run is due; if it polled too early it exits with nothing to do, so try again.
    log_path = Path(env["PREFECT_HOME"]) / "worker.log"
    deadline = time.time() + 600
    while True:
        time.sleep(max(0.0, (starts[0] - datetime.now(timezone.utc)).total_seconds() - 8))
        with open(log_path, "a") as log:
            worker = subprocess.Popen([str(VENV_BIN / "prefect"), "worker", "start", "--pool", POOL, "--run-once"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = worker.wait(max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                stop_process_group(worker)  # the worker and any flow-run process it left
        state = _api(api, f"/flow_runs/{first['id']}")["state"]
        assert rc == 0, f"worker exit {rc}, run {state['type']}:\n{log_path.read_text()[-4000:]}"
        if state["type"] == "COMPLETED":
            break
        assert state["type"] == "SCHEDULED" and time.time() < deadline, f"run {state['type']} ({state.get('message')}):\n{log_path.read_text()[-4000:]}"

    after = {r["id"]: r for r in _runs(api, dep["id"])}
    assert all(r["auto_scheduled"] for r in after.values())  # every run of it came from the scheduler
    assert [r["id"] for r in after.values() if r["state"]["type"] != "SCHEDULED"] == [first["id"]]  # the worker ran exactly that one
    assert (deployed["storage"] / "scheduled" / "iter-01" / "model" / "_MANIFEST.json").exists()
