"""`ipr run` checks what it can before a Prefect server starts or a stage runs:
one `ipr: error:` line naming the field, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "override, named",
    [("env.options.levle=BabyAI-GoToObj-v0", "levle"), ("env.name=babyia", "babyia"), ("model.base=/nonexistent/model", "model.base")],
)
def test_bad_input_fails_before_any_work(tmp_path, override, named):
    pytest.importorskip("minigrid")
    root = tmp_path / "artifacts"
    env = {"PATH": str(Path(sys.executable).parent), "PREFECT_HOME": str(tmp_path / "prefect"), "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "ipr_cli.main", "run", "-c", str(ROOT / "configs" / "demo.yaml"), "--set", f"storage.root={root}", "--set", override], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    first = out.stderr.strip().splitlines()[0]
    assert first.startswith("ipr: error:") and named in first, out.stderr
    assert not root.exists() and not (tmp_path / "prefect").exists()  # no artifact, no Prefect home: nothing started


def _run_cli(tmp_path: Path, root: str, extra_env: dict | None = None, *sets: str) -> subprocess.CompletedProcess:
    env = {"PATH": str(Path(sys.executable).parent), "PREFECT_HOME": str(tmp_path / "prefect"), "HOME": str(tmp_path), **(extra_env or {})}
    args = [a for kv in sets for a in ("--set", kv)]
    return subprocess.run([sys.executable, "-m", "ipr_cli.main", "run", "-c", str(ROOT / "configs" / "demo.yaml"), "--set", f"storage.root={root}", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def _one_error_line(out: subprocess.CompletedProcess, *named: str) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    first = out.stderr.strip().splitlines()[0]
    assert first.startswith("ipr: error:") and all(n in first for n in named), out.stderr
    return first


def test_a_storage_root_under_a_file_fails_before_any_work(tmp_path):
    pytest.importorskip("minigrid")
    (tmp_path / "plain-file").write_text("x")
    out = _run_cli(tmp_path, str(tmp_path / "plain-file" / "artifacts"))
    _one_error_line(out, "storage.root", "is a file, not a directory")
    assert not (tmp_path / "prefect").exists()


def test_an_s3_root_without_credentials_fails_before_any_work(tmp_path):
    pytest.importorskip("minigrid")
    out = _run_cli(tmp_path, "s3://some-bucket/runs", {"AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"})
    _one_error_line(out, "storage.root", "no AWS credentials")
    assert not (tmp_path / "prefect").exists()


def test_a_stalled_s3_endpoint_is_an_error_not_a_hang(tmp_path):
    """An endpoint that accepts connections and never answers: a clear error within the probe's bound."""
    import socket

    pytest.importorskip("minigrid")
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes handshakes; nothing ever replies
        port = silent.getsockname()[1]
        creds = {"AWS_ACCESS_KEY_ID": "fake", "AWS_SECRET_ACCESS_KEY": "fake", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_EC2_METADATA_DISABLED": "true"}
        out = _run_cli(tmp_path, "s3://some-bucket/runs", creds, "storage.check_timeout_s=3")
    _one_error_line(out, "storage.root", "no answer from", f"127.0.0.1:{port}", "within 3 s")  # the configured bound ended it (the subprocess timeout guards a hang)
    assert not (tmp_path / "prefect").exists()


def test_config_check_runs_the_checks_alone(tmp_path):
    pytest.importorskip("minigrid")
    env = {"PATH": str(Path(sys.executable).parent), "PREFECT_HOME": str(tmp_path / "prefect"), "HOME": str(tmp_path)}

    def check(*args):
        return subprocess.run([sys.executable, "-m", "ipr_cli.main", "config", "check", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    root = tmp_path / "artifacts"
    ok = check("-c", str(ROOT / "configs" / "demo.yaml"), "--set", f"storage.root={root}")
    assert ok.returncode == 0 and ok.stdout.strip() == f"ok: {root}/ipr-demo", ok.stderr
    exp = check("--experiment", str(ROOT / "configs" / "experiment-gotoobj.yaml"), "--set", f"storage.root={root}")
    assert exp.returncode == 0 and len(exp.stdout.splitlines()) == 9, exp.stdout + exp.stderr  # 3 variants x 3 seeds
    dask = check("-c", str(ROOT / "configs" / "demo.yaml"), "--set", f"storage.root={root}", "--set", "pipeline.task_runner=dask", "--set", "pipeline.dask_address=tcp://127.0.0.1:1", "--set", "storage.shared_local_root=true")
    _one_error_line(dask, "pipeline.dask_address", "not reachable")
    assert not root.exists() and not (tmp_path / "prefect").exists()


@pytest.mark.parametrize(
    "overrides, named",
    [
        (["env.val_tasks=4", "env.val_split=nope"], ["env.val_tasks=4", "env.val_split='nope'", "unknown split 'nope'"]),
        (["env.eval_split=nope"], ["env.eval_tasks=32", "env.eval_split='nope'", "unknown split 'nope'"]),
        (["env.name=intercode_sql", "env.options={}"], ["env.train_tasks=32 x training.sft.expert_episodes_multiplier=12", "384 requested"]),
        (["env.name=intercode_sql", "env.options={}", "env.train_tasks=2", "training.sft.expert_episodes_multiplier=1", "env.eval_tasks=100000"], ["env.eval_tasks=100000", "requested"]),
    ],
)
def test_task_counts_and_splits_fail_before_any_work(tmp_path, overrides, named):
    """A split the environment lacks, or more tasks than it offers, fails at the check."""
    pytest.importorskip("minigrid")
    root = tmp_path / "artifacts"
    env = {"PATH": str(Path(sys.executable).parent), "PREFECT_HOME": str(tmp_path / "prefect"), "HOME": str(tmp_path)}
    sets = [x for o in overrides for x in ("--set", o)]
    out = subprocess.run([sys.executable, "-m", "ipr_cli.main", "run", "-c", str(ROOT / "configs" / "demo.yaml"), "--set", f"storage.root={root}", *sets], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    _one_error_line(out, *named)
    assert not root.exists() and not (tmp_path / "prefect").exists()
