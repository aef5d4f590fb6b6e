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
