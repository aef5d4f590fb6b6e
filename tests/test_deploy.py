"""prefect.yaml deploys to a local server and a process worker completes a run."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest

from helpers import TINY_DEPLOY
from prefect_fixtures import VENV_BIN, prefect_server  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("minigrid")



def _prefect(args, env, timeout=300):
    out = subprocess.run([str(VENV_BIN / "prefect"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"prefect {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_deploy_and_worker_run(prefect_server, tmp_path):  # noqa: F811
    api, env = prefect_server
    env = {**env, "IPR_FLOW_HOME": str(ROOT)}
    pool = "ipr-cpu"  # the pool prefect.yaml names (a fresh test server)
    _prefect(["work-pool", "create", pool, "--type", "process", "--overwrite"], env)
    _prefect(["deploy", "--all", "--no-prompt"], env)
    overrides = TINY_DEPLOY + [f"storage.root={tmp_path / 'artifacts'}", "run_name=deployed"]
    out = _prefect(["deployment", "run", "ipr-from-config/demo", "--param", f"overrides={json.dumps(overrides)}"], env)
    assert "Created flow run" in out
    worker = subprocess.run([str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--run-once"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert worker.returncode == 0, worker.stdout[-3000:] + worker.stderr[-3000:]
    # the flow run completed, and the nightly deployment carries its cron schedule
    req = urllib.request.Request(f"{api}/flow_runs/filter", data=b"{}", headers={"Content-Type": "application/json"})
    runs = json.loads(urllib.request.urlopen(req, timeout=30).read())
    states = {r["name"]: r["state"]["type"] for r in runs if r.get("deployment_id")}
    assert "COMPLETED" in states.values(), states
    deps = json.loads(urllib.request.urlopen(urllib.request.Request(f"{api}/deployments/filter", data=b"{}", headers={"Content-Type": "application/json"}), timeout=30).read())
    nightly = next(d for d in deps if d["name"] == "nightly")
    assert any(s["schedule"].get("cron") == "0 2 * * *" for s in nightly["schedules"])
    experiment = next(d for d in deps if d["name"] == "experiment-gotoobj")
    assert experiment["entrypoint"] == "flows/deploy_entry.py:ipr_experiment_from_file"
    assert experiment["parameters"]["experiment_path"] == "configs/experiment-gotoobj.yaml"
    assert all(d["job_variables"]["env"]["PREFECT_LOGGING_EXTRA_LOGGERS"] == "ipr_core" for d in deps)  # ipr_core logs reach the UI
    assert (tmp_path / "artifacts" / "deployed" / "iter-01" / "model" / "_MANIFEST.json").exists()


def test_a_missing_config_path_names_it_and_ipr_flow_home(tmp_path, monkeypatch):
    from flows.deploy_entry import ipr_experiment_from_file, ipr_from_config
    from ipr_core.config import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("IPR_FLOW_HOME", raising=False)
    with pytest.raises(ConfigError, match=r"config_path 'configs/demo.yaml' not found .*IPR_FLOW_HOME is not set"):
        ipr_from_config.fn("configs/demo.yaml")
    monkeypatch.setenv("IPR_FLOW_HOME", "/somewhere")
    with pytest.raises(ConfigError, match=r"experiment_path 'x.yaml' not found .*IPR_FLOW_HOME=/somewhere"):
        ipr_experiment_from_file.fn("x.yaml")
