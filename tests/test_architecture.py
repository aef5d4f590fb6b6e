"""Import boundaries: the algorithm layer never depends on the orchestrator."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_ipr_core_never_imports_prefect_or_pipeline_layers():
    files = list((ROOT / "ipr_core").rglob("*.py"))
    assert len(files) > 5
    bad = {str(f.relative_to(ROOT)): sorted(_imports(f) & {"prefect", "prefect_dask", "prefect_ray", "tasks", "flows", "ipr_cli"}) for f in files}
    assert not {k: v for k, v in bad.items() if v}


def test_ipr_core_import_does_not_load_prefect():
    import subprocess
    import sys

    code = "import sys, ipr_core.config, ipr_core.store, ipr_core.schemas, ipr_core.types, ipr_core.conversation, ipr_core.envs; print('prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout.strip()
    assert out == "False"


def _calls(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "") for n in ast.walk(tree) if isinstance(n, ast.Call)}


def test_only_the_stage_layer_writes_datasets_and_checkpoints():
    """Artifacts are written by ipr_core/pipeline/runner.py (through ipr_core/store.py) alone:
    stage bodies return data, CLI commands publish through the runner."""
    writers = {"write_dataset", "write_checkpoint", "copy_artifact"}
    allowed = {"ipr_core/store.py", "ipr_core/pipeline/runner.py"}
    files = [f for d in ("ipr_core", "tasks", "flows", "ipr_cli", "bench") for f in (ROOT / d).rglob("*.py")]
    bad = sorted(str(f.relative_to(ROOT)) for f in files if _calls(f) & writers and str(f.relative_to(ROOT)) not in allowed)
    assert not bad, f"these write artifacts around the stage layer: {bad}"
