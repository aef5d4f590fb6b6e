"""`ipr export`: a Hub-ready model folder and the run's datasets, from a tiny run.

One tiny BabyAI run (in-process, no Prefect; with validation tasks, so the
best model is chosen on them) is made per module and exported once with the
`ipr` executable. The export must load as any Hugging Face user would load it
(`from_pretrained`, `load_dataset("parquet", data_dir=...)`), carry no
`_MANIFEST.json`, and its model card must name the run's evaluation numbers.
Bad input (`--iteration`, a non-empty `--out`) exits 2 with one `ipr: error:`
line and writes nothing; a failure half-way leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from a model hub
os.environ["HF_DATASETS_OFFLINE"] = "1"

import pytest  # noqa: E402
import yaml  # noqa: E402

from helpers import TINY_RUN  # noqa: E402
from ipr_core import store  # noqa: E402
from ipr_core.config import load_config  # noqa: E402

pytest.importorskip("minigrid")
pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
IPR = Path(sys.executable).with_name("ipr")


def ipr(*args: str) -> subprocess.CompletedProcess:
    exe = [str(IPR)] if IPR.exists() else [sys.executable, "-m", "ipr_cli.main"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([*exe, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run (SFT + 1 iteration, test and validation evaluations): (run folder, config, result rows)."""
    from ipr_core.pipeline import run_local, run_plan, run_uri
    from ipr_core.pipeline.summary import result_rows

    root = tmp_path_factory.mktemp("export-run")
    cfg = load_config(None, [*TINY_RUN, "env.val_tasks=2", f"storage.root={root}", "run_name=tiny"])
    run_local(cfg)
    uri = run_uri(cfg)
    return uri, cfg, result_rows(uri, run_plan(cfg, uri))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """`ipr export RUN --out OUT` (the best model): OUT and the command's stdout."""
    out = tmp_path_factory.mktemp("hub") / "tiny-export"
    res = ipr("export", run[0], "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out, res.stdout


def _card(out: Path) -> tuple[dict, str]:
    text = (out / "model" / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def _best(run) -> str:
    from ipr_core.pipeline.summary import best

    top, on, _ = best(run[2])
    assert on == "val"  # the run has validation tasks: the best is chosen on them
    return top["model"]


def test_the_command_says_what_it_wrote(exported, run):
    out, stdout = exported
    assert f"exported {_best(run)} of {run[0]}" in stdout
    for what in ("model/", "datasets/sft/", "datasets/pairs/", "datasets/eval/", "model.safetensors", f"wrote {out}"):
        assert what in stdout, stdout


def test_the_model_loads_and_generates_with_from_pretrained(exported, run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from ipr_core.policies.checkpoint_io import load_tokenizer

    folder = exported[0] / "model"
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert GenerationConfig.from_pretrained(folder).eos_token_id == tok.eos_token_id
    messages = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "go to the red ball"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)  # as the model card shows
    with torch.no_grad():
        new = model.generate(**ids, max_new_tokens=4, do_sample=False)[0][ids["input_ids"].shape[1] :]
    assert 1 <= len(new) <= 4
    # The plain AutoTokenizer splits text as the project's own loader does (the reload gotcha, docs/models.md).
    text = "Thought: I see 2 red balls\nAction: go forward"
    project = load_tokenizer(store.read_checkpoint(store.join(run[0], "sft", "model")))
    assert tok(text)["input_ids"] == project(text)["input_ids"]


def test_each_dataset_loads_with_data_dir(exported, run, tmp_path):
    from datasets import load_dataset

    from ipr_core.pipeline import run_plan

    out, (uri, cfg, _) = exported[0], run
    nodes = run_plan(cfg, uri)
    sft = load_dataset("parquet", data_dir=str(out / "datasets" / "sft"), cache_dir=str(tmp_path))
    experts = store.read_rows(store.join(uri, "experts", "train"), "trajectories")
    assert list(sft) == ["train"] and sft["train"].num_rows == sum(e["success"] and e["error"] is None for e in experts)
    msgs = sft["train"][0]["messages"]
    assert [m["role"] for m in msgs[:3]] == ["system", "user", "assistant"] and set(msgs[0]) == {"role", "content"}

    pairs = load_dataset("parquet", data_dir=str(out / "datasets" / "pairs"), cache_dir=str(tmp_path))["train"]
    run_pairs = [n for n in nodes if n.stage == "pairs"]
    assert pairs.num_rows == sum(store.read_manifest(store.join(uri, n.key)).rows for n in run_pairs) > 0
    assert {"prompt", "chosen", "rejected", "kind", "step", "chosen_step_reward", "rejected_step_reward", "iteration"} <= set(pairs.column_names)
    assert pairs[0]["chosen"][0]["role"] == "assistant"

    ev = load_dataset("parquet", data_dir=str(out / "datasets" / "eval"), cache_dir=str(tmp_path))
    assert set(ev) == {"test", "validation"}
    assert set(ev["test"]["split"]) == {"test"} and set(ev["validation"]["split"]) == {"val"}
    evals = [n for n in nodes if n.stage == "evaluate"]
    assert ev["test"].num_rows + ev["validation"].num_rows == sum(store.read_manifest(store.join(uri, n.key)).rows for n in evals)
    assert {"task_id", "model", "iteration", "outcome_reward", "success", "split"} <= set(ev["test"].column_names)

    # The folder is also one Hub dataset repo whose card names the three configs.
    assert load_dataset(str(out / "datasets"), "pairs", cache_dir=str(tmp_path))["train"].num_rows == pairs.num_rows


def test_no_manifest_anywhere_and_the_weights_are_the_runs(exported, run):
    out, best = exported[0], _best(run)
    assert not list(out.rglob("_MANIFEST.json"))
    for name in ("sft", "pairs", "eval"):
        assert {p.suffix for p in (out / "datasets" / name).iterdir()} == {".parquet"}
    key = "sft/model" if best == "sft" else f"{best}/model"
    m = store.read_manifest(store.join(run[0], key))
    assert {p.name for p in (out / "model").iterdir()} == {f.path for f in m.files} | {"README.md"}
    assert {f.path: sha256(out / "model" / f.path) for f in m.files} == {f.path: f.sha256 for f in m.files}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {f.path for f in m.files}
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary sibling left


def test_the_model_card_names_the_evaluation_numbers(exported, run):
    meta, body = _card(exported[0])
    assert meta["library_name"] == "transformers" and {"ipr", "agent"} <= set(meta["tags"])
    assert "base_model" not in meta  # a tiny model built from scratch has none
    for section in ("## Method", "## Training config", "## Data", "## Evaluation", "## How it was made"):
        assert section in body
    lines = {line.split("|")[1].strip().replace("**", "").replace(" (this model)", ""): line for line in body.splitlines() if line.startswith("| ") and "---" not in line}
    rows = run[2]
    assert {r["model"] for r in rows} == {"base", "sft", "iter-01"}
    for r in rows:
        cells = [c.strip() for c in lines[r["model"]].split("|")[2:5]]
        assert cells == [f"{r['success_rate']:.3f}", f"{r['mean_reward']:.3f}", f"{r['val_mean_reward']:.3f}"], (r, lines[r["model"]])
    assert f"**{_best(run)}** (this model)" in body and "chosen on the validation tasks" in body
    assert "4 training, 4 test (split `test`), 2 validation tasks (split `dev`)" in body


def test_the_card_commands_reproduce_the_run_and_the_export(exported, run):
    _, body = _card(exported[0])
    block = body.split("## How it was made")[1].split("```bash\n")[1].split("```")[0].strip().splitlines()
    run_line, export_line = block
    assert export_line == f"ipr export {shlex.quote(run[0])} --iteration best --out {shlex.quote(str(exported[0]))}"
    words = shlex.split(run_line)
    assert words[:4] == ["ipr", "run", "--config", "configs/demo.yaml"]
    sets = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    again = load_config(DEMO, sets).model_dump(mode="json")
    want = run[1].model_dump(mode="json")
    again["storage"].pop("root"), want["storage"].pop("root")
    assert again == want


@pytest.mark.parametrize("bad", ["7", "latest"])
def test_a_bad_iteration_exits_2_naming_the_flag_and_writes_nothing(run, tmp_path, bad):
    out = tmp_path / "never"
    res = ipr("export", run[0], "--iteration", bad, "--out", str(out))
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("ipr: error: --iteration") and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_iteration_n_exports_that_iterations_checkpoint(run, tmp_path):
    out = tmp_path / "iter1"
    res = ipr("export", run[0], "--iteration", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr
    m = store.read_manifest(store.join(run[0], "iter-01", "model"))
    assert {f.path: sha256(out / "model" / f.path) for f in m.files} == {f.path: f.sha256 for f in m.files}
    _, body = _card(out)
    assert "**iter-01** (after IPR iteration 1): exported as asked with `--iteration 1`" in body


def test_a_non_empty_out_needs_force(run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = ipr("export", run[0], "--out", str(out))
    assert res.returncode == 2 and "not empty" in res.stderr and "--force" in res.stderr, res.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = ipr("export", run[0], "--iteration", "0", "--out", str(out), "--force")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["datasets", "model"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # the replaced folder and the temporary one are gone


def test_the_run_folder_itself_is_refused(run):
    res = ipr("export", run[0], "--out", str(Path(run[0]) / "export"), "--force")
    assert res.returncode == 2 and "overlaps the run folder" in res.stderr, res.stderr


def test_a_failure_half_way_leaves_nothing(run, tmp_path, monkeypatch):
    from ipr_core import export

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "copy_model", broken)
    with pytest.raises(OSError, match="disk full"):
        export.export_run(run[1], run[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_eval_table_rounds_every_number_and_marks_the_export():
    from ipr_core.export import eval_table

    rows = [
        {"model": "base", "success_rate": 0.125, "mean_reward": 0.0625, "val_mean_reward": None, "note": None},
        {"model": "sft", "success_rate": 0.5, "mean_reward": 0.41666, "val_mean_reward": 0.33333, "note": None},
        {"model": "iter-01", "success_rate": 0.75, "mean_reward": 0.6789, "val_mean_reward": 0.55555, "note": "train cut by its time cap at 3/4 steps"},
    ]
    table = eval_table(rows, "iter-01")
    assert "| base | 0.125 | 0.062 | - |" in table
    assert "| sft | 0.500 | 0.417 | 0.333 |" in table
    assert "| **iter-01** (this model) | 0.750 | 0.679 | 0.556 |" in table
    assert "- iter-01: train cut by its time cap at 3/4 steps" in table


def test_base_model_is_named_where_a_hub_id_can_be(tmp_path):
    from ipr_core.export import base_model_id

    assert base_model_id("tiny") is None
    assert base_model_id("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("/root/.cache/huggingface/hub/models--Qwen--Qwen2.5-0.5B/snapshots/abc") == "Qwen/Qwen2.5-0.5B"
    local = tmp_path / "smollm2-135m"
    local.mkdir()
    (local / "config.json").write_text("{}")
    assert base_model_id(str(local)) is None  # a local folder with no Hub id in it: left out, not guessed
