"""Export a run for the Hugging Face Hub: one model folder and the run's datasets.

``export_run(cfg, run, out)`` writes::

    OUT/model/      the chosen checkpoint's files (weights, config.json,
                    generation_config.json, tokenizer) and README.md, a model
                    card; no _MANIFEST.json (it holds local absolute paths)
    OUT/datasets/   README.md (a dataset card naming three configs) and
        sft/        train-00000-of-00001.parquet: the successful expert
                    trajectories as TRL conversational ``messages`` rows
        pairs/      train-00000-of-00001.parquet: every iteration's pairs
                    (prompt / chosen / rejected + the IPR columns)
        eval/       test-...parquet and validation-...parquet: every
                    evaluation row, with a ``split`` column

Each dataset folder holds Parquet files only, so
``datasets.load_dataset("parquet", data_dir=OUT/datasets/sft)`` reads it.
Everything is checked before anything is written (``--iteration``, the
destination), written into a temporary sibling of OUT, and renamed into place
last: a failure leaves no half-written export. Nothing here loads a model.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel

from ipr_core import code_version, ipr, store
from ipr_core.config import ConfigError, IPRConfig, load_config
from ipr_core.pipeline.dag import Node, run_plan
from ipr_core.pipeline.stages import read_trajectories
from ipr_core.pipeline.summary import SELECTED_BY, best, result_rows
from ipr_core.report import number
from ipr_core.schemas import from_rows, get_schema

FLAG = "--iteration"
EVAL_FILES = {"test": "test", "val": "validation"}  # pipeline split -> file name prefix (a datasets split keyword)
ONE_FILE = "-00000-of-00001.parquet"
DIGITS = 3  # the model card's rounding


@dataclass(frozen=True)
class Choice:
    """The checkpoint to export: its tag (``sft``, ``iter-01``...), iteration
    (0 for SFT), artifact key in the run folder, and why it was picked."""

    tag: str
    iteration: int
    key: str
    reason: str
    note: str | None = None  # how the best was chosen, ties, a base that scored higher


@dataclass(frozen=True)
class ExportResult:
    out: Path
    choice: Choice
    model_files: tuple[tuple[str, int], ...]  # (name, bytes), README.md included
    datasets: Mapping[str, Mapping[str, int]]  # dataset -> {file: rows}


# --- which checkpoint ------------------------------------------------------------------


def parse_iteration(text: str | int) -> int | None:
    """``best`` -> None, a number -> that iteration (0 is the SFT model)."""
    if isinstance(text, int) or str(text).strip().isdigit():
        return int(text)
    if str(text).strip() == "best":
        return None
    raise ValueError(f"{FLAG} must be 'best' or an iteration number (0 = the SFT model), got {text!r}")


def checkpoints(run: str, nodes: Sequence[Node]) -> dict[int, str]:
    """Iteration -> artifact key of every complete model of the run (0: SFT)."""
    models = {0 if n.stage == "sft" else int(n.iteration): n.key for n in nodes if n.stage in ("sft", "train")}
    return {k: key for k, key in sorted(models.items()) if store.exists(store.join(run, key))}


def tag_of(iteration: int) -> str:
    return "sft" if iteration == 0 else f"iter-{iteration:02d}"


def _best_reason(top: Mapping[str, Any], on: str) -> str:
    key, what = SELECTED_BY[on], ("validation" if on == "val" else "test")
    return f"the run's best model: the highest {what} mean reward ({top[key]:.{DIGITS}f}) among SFT and the iterations, chosen on the {what} tasks"


def choose(run: str, nodes: Sequence[Node], rows: Sequence[Mapping[str, Any]], iteration: int | None) -> Choice:
    """The checkpoint ``--iteration`` names (None: the best, as the pipeline picks it);
    a ValueError naming the flag when the run has no such model."""
    have = checkpoints(run, nodes)
    top, on, note = best(rows)
    if iteration is None:
        if top is None:
            raise ValueError(f"{FLAG} best: {run} has no evaluated trained model yet ({note}); pass {FLAG} N for one of its checkpoints {sorted(have)}")
        k = 0 if top["model"] == "sft" else int(top["model"].split("-")[1])
        if k not in have:
            raise ValueError(f"{FLAG} best: the best model, {top['model']}, has no complete checkpoint in {run} (deleted?); pass {FLAG} N for one of {sorted(have)}")
        return Choice(top["model"], k, have[k], _best_reason(top, on), note)
    if iteration not in have:
        listed = ", ".join(f"{k} ({tag_of(k)})" for k in have) or "none"
        raise ValueError(f"{FLAG} {iteration}: {run} has no such checkpoint; its checkpoints are: {listed}, or {FLAG} best")
    picked = "" if top is None else f"; the run's best is {top['model']} (chosen on the {'validation' if on == 'val' else 'test'} tasks)"
    return Choice(tag_of(iteration), iteration, have[iteration], f"exported as asked with `{FLAG} {iteration}`{picked}", note)


# --- where it goes ---------------------------------------------------------------------


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_out(out: Path, run: str, force: bool) -> None:
    """A ValueError unless ``out`` may receive the export: absent, empty, or
    (with ``force``) a folder to replace; never the run folder, inside it or above it."""
    if "://" not in run and _overlaps(out, Path(run).resolve()):
        raise ValueError(f"--out {out}: overlaps the run folder {run}; export somewhere else")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty; pass --force to replace it")


# --- the model folder ------------------------------------------------------------------


def copy_model(run: str, key: str, dest: Path) -> list[tuple[str, int]]:
    """The checkpoint's files (as its manifest lists them, verified) into ``dest``,
    without the manifest; a generation_config.json from config.json if it has none."""
    uri = store.join(run, key)
    src, m = store.read_checkpoint(uri), store.read_manifest(uri)
    dest.mkdir(parents=True)
    for part in m.files:
        (dest / part.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / part.path, dest / part.path)
    if not (dest / "generation_config.json").exists():
        _generation_config(dest)
    return [(p.relative_to(dest).as_posix(), p.stat().st_size) for p in sorted(dest.rglob("*")) if p.is_file()]


def _generation_config(folder: Path) -> None:
    """The token ids generation needs, from the model's config.json."""
    cfg = json.loads((folder / "config.json").read_text())
    ids = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    (folder / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")


# --- the datasets ----------------------------------------------------------------------


def _existing(run: str, nodes: Sequence[Node], stage: str) -> list[Node]:
    return [n for n in nodes if n.stage == stage and store.exists(store.join(run, n.key))]


def sft_table(run: str, nodes: Sequence[Node]) -> pa.Table:
    """The successful expert trajectories (what SFT trains on) as TRL conversational rows."""
    experts = next(n for n in nodes if n.stage == "experts")
    return from_rows(ipr.sft_rows(read_trajectories(store.join(run, experts.key))), "sft", "sft rows")


def pairs_table(run: str, nodes: Sequence[Node]) -> pa.Table:
    """Every iteration's pairs, in iteration order."""
    tables = [store.read_dataset(store.join(run, n.key), "pairs") for n in _existing(run, nodes, "pairs")]
    return pa.concat_tables(tables) if tables else get_schema("pairs").schema.empty_table()


def eval_tables(run: str, nodes: Sequence[Node]) -> dict[str, pa.Table]:
    """Every evaluation's rows with a ``split`` column (test, val), per split."""
    out: dict[str, list[pa.Table]] = {}
    for n in _existing(run, nodes, "evaluate"):
        split = dict(n.params)["split"]
        t = store.read_dataset(store.join(run, n.key), "eval")
        out.setdefault(split, []).append(t.append_column("split", pa.array([split] * t.num_rows, pa.string())))
    return {s: pa.concat_tables(ts) for s, ts in out.items()}


def write_parquet(table: pa.Table, path: Path) -> tuple[str, int]:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd")
    return path.name, table.num_rows


def write_datasets(run: str, nodes: Sequence[Node], dest: Path) -> dict[str, dict[str, int]]:
    """sft/, pairs/ and eval/ under ``dest`` (Parquet only) and a dataset card; returns {dataset: {file: rows}}."""
    written = {
        "sft": dict([write_parquet(sft_table(run, nodes), dest / "sft" / f"train{ONE_FILE}")]),
        "pairs": dict([write_parquet(pairs_table(run, nodes), dest / "pairs" / f"train{ONE_FILE}")]),
        "eval": dict(write_parquet(t, dest / "eval" / f"{EVAL_FILES[s]}{ONE_FILE}") for s, t in sorted(eval_tables(run, nodes).items())),
    }
    (dest / "README.md").write_text(dataset_card(written))
    return written


def dataset_card(written: Mapping[str, Mapping[str, int]]) -> str:
    """A Hub dataset card whose configs name the three folders."""
    configs = [
        {"config_name": name, "data_files": [{"split": f.split("-")[0], "path": f"{name}/{f.split('-')[0]}-*.parquet"} for f in files]}
        for name, files in written.items()
    ]
    head = yaml.safe_dump({"tags": ["ipr", "agent"], "configs": configs}, sort_keys=False)
    rows = "\n".join(f"| `{name}` | {', '.join(f'{f} ({r} rows)' for f, r in files.items())} |" for name, files in written.items())
    return f"---\n{head}---\n\n# IPR run datasets\n\n| config | files |\n|---|---|\n{rows}\n\n{DATASET_NOTES}"


DATASET_NOTES = """- `sft`: the successful expert trajectories, `messages` in TRL's conversational format (what the SFT stage trains on).
- `pairs`: IPR's preference pairs: `prompt`, `chosen`, `rejected` (conversational) plus `kind` (outcome | step), `step`, the step rewards and outcomes, `iteration`.
- `eval`: one row per held-out task and evaluated model; `split` is `test` (reported) or `val` (selects the best iteration).
"""


# --- the command that made the run -----------------------------------------------------


def _leaves(m: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Every field of a config as ``dotted.name -> value`` (free-form dicts are one value)."""
    out: dict[str, Any] = {}
    for name in type(m).model_fields:
        v = getattr(m, name)
        out.update(_leaves(v, f"{prefix}{name}.") if isinstance(v, BaseModel) else {f"{prefix}{name}": v})
    return out


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


def run_command(cfg: IPRConfig, base_file: Path | None) -> str | None:
    """``ipr run --config BASE --set ...``: the overrides of ``base_file`` that give
    ``cfg`` (storage.root left out); None when there is no base file or the
    overrides do not reproduce ``cfg``."""
    if base_file is None or not base_file.is_file():
        return None
    base, want = _leaves(load_config(base_file)), _leaves(cfg)
    sets = [f"{k}={_yaml_value(v)}" for k, v in want.items() if k != "storage.root" and v != base[k]]
    try:
        again = _leaves(load_config(base_file, sets))
    except ConfigError:
        return None
    if {k: v for k, v in again.items() if k != "storage.root"} != {k: v for k, v in want.items() if k != "storage.root"}:
        return None
    shown = f"configs/{base_file.name}" if base_file.parent.name == "configs" else str(base_file)
    return " ".join(["ipr run --config", shlex.quote(shown), *(f"--set {shlex.quote(s)}" for s in sets)])


# --- the model card --------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_id(base: str) -> str | None:
    """The Hub id of ``model.base`` where one can be named: a Hub cache path
    (``.../models--owner--name/...``), a local checkpoint whose config.json
    records a Hub ``_name_or_path``, or ``owner/name`` that is no local folder;
    None for ``tiny`` and for local folders that name no Hub model (not guessed)."""
    if base == "tiny":
        return None
    cached = re.search(r"models--([^/]+?)--([^/]+)", base)
    if cached:
        return f"{cached.group(1)}/{cached.group(2)}"
    cfg = Path(base).expanduser() / "config.json"
    if cfg.is_file():
        name = json.loads(cfg.read_text()).get("_name_or_path", "")
        return name if isinstance(name, str) and _HUB_ID.match(name) else None
    return base if _HUB_ID.match(base) else None


@dataclass(frozen=True)
class CardFacts:
    """What the model card says, gathered from the run (``card_facts``)."""

    cfg: IPRConfig
    rows: Sequence[Mapping[str, Any]]
    choice: Choice
    iterations_done: int
    experts: int
    experts_ok: int
    pair_counts: Mapping[int, Mapping[str, int]]  # iteration -> kind -> pairs
    dataset_rows: Mapping[str, int]
    run_command: str | None
    export_command: str


def front_matter(cfg: IPRConfig) -> str:
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["ipr", "agent", "dpo", cfg.env.name]}
    hub = base_model_id(cfg.model.base)
    if hub:
        meta["base_model"] = hub
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n"


def _method(f: CardFacts) -> str:
    c = f.cfg
    if c.model.base == "tiny":
        start = f"a tiny {c.model.tiny.arch} model ({c.model.tiny.num_layers} layers, hidden size {c.model.tiny.hidden_size}) built from scratch, with a byte-level BPE tokenizer trained on the environment's text"
    else:
        start = f"`{base_model_id(c.model.base) or Path(c.model.base).name}`"
    return (
        "## Method\n\n"
        "IPR (Iterative step-level Process Refinement, Xiong et al., EMNLP 2024), trained with "
        f"ipr-flow {code_version()}: SFT on expert trajectories, Monte Carlo step rewards from the SFT model, "
        "exploration along every expert trajectory, outcome- and step-level contrastive pairs, and a mixed "
        "outcome-DPO + step-DPO + SFT loss, iterated.\n\n"
        f"- Base model: {start}.\n"
        f"- Iterations: {f.iterations_done} of {c.pipeline.iterations} planned.\n"
        f"- This model: **{f.choice.tag}** ({'the SFT model' if f.choice.iteration == 0 else f'after IPR iteration {f.choice.iteration}'}): {f.choice.reason}.\n"
        + (f"- Selection note: {f.choice.note}.\n" if f.choice.note else "")
    )


def _training(c: IPRConfig) -> str:
    s, t = c.training.sft, c.training.ipr
    items = [
        ("seed", c.seed),
        ("SFT", f"{s.epochs:g} epochs, lr {s.lr:g}, batch {s.batch_size} x {s.grad_accum}, {s.scheduler}, max length {s.max_length}, {s.expert_episodes_multiplier} expert episode(s) per task"),
        ("IPR loss (Eq. 10)", f"beta {t.beta:g}, w_outcome {t.w_outcome:g}, w_step {t.w_step:g}, w_sft {t.w_sft:g} (SFT term on {t.sft_target}), reference: {t.reference}"),
        ("IPR optimisation", f"{t.epochs:g} epochs per iteration, lr {t.lr:g}, batch {t.batch_size} x {t.grad_accum}, warmup {t.warmup_ratio:g}, LoRA {'r=' + str(t.lora_r) if t.lora else 'off'}"),
        ("MC step rewards", f"{c.mc.n_rollouts} rollouts per step at temperature {c.mc.temperature:g}"),
        ("pairs", f"tau_s {c.pairs.tau_step:g}, tau_o {c.pairs.tau_outcome:g}, step sides: {c.pairs.step_variant}, outcome pairs {'on' if c.pairs.outcome_pairs else 'off'}, step pairs {'on' if c.pairs.step_pairs else 'off'}"),
        ("context", f"history_turns {c.sampling.history_turns} (past steps in the prompt), {c.sampling.max_new_tokens} new tokens per turn"),
        ("precision", c.training.precision),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in items)
    full = yaml.safe_dump({k: v for k, v in c.model_dump(mode="json").items() if k != "storage"}, sort_keys=False)
    return f"## Training config\n\n| | |\n|---|---|\n{table}\n\n<details><summary>The run's whole config (storage left out)</summary>\n\n```yaml\n{full}```\n\n</details>\n"


def _data(f: CardFacts) -> str:
    e = f.cfg.env
    pairs = "; ".join(f"iteration {k}: {n.get('outcome', 0)} outcome, {n.get('step', 0)} step" for k, n in sorted(f.pair_counts.items())) or "none"
    val = f"{e.val_tasks} validation tasks (split `{e.val_split}`)" if e.val_tasks else "no validation tasks"
    return (
        "## Data\n\n"
        f"- Environment: `{e.name}`" + (f", options `{json.dumps(e.options, sort_keys=True)}`" if e.options else "") + "\n"
        f"- Tasks: {e.train_tasks} training, {e.eval_tasks} test (split `{e.eval_split}`), {val}.\n"
        f"- Expert trajectories: {f.experts} collected, {f.experts_ok} successful (the SFT data).\n"
        f"- Pairs: {pairs}.\n"
        f"- Exported with this model (`datasets/`, Parquet): sft {f.dataset_rows.get('sft', 0)} rows, pairs {f.dataset_rows.get('pairs', 0)} rows, eval {f.dataset_rows.get('eval', 0)} rows.\n"
    )


def eval_table(rows: Sequence[Mapping[str, Any]], exported: str) -> str:
    """Every evaluated model: test success rate and mean reward, validation mean reward."""
    head = "| model | test success rate | test mean reward | validation mean reward |\n|---|---|---|---|\n"
    lines = [f"| {'**' + r['model'] + '** (this model)' if r['model'] == exported else r['model']} | {number(r.get('success_rate'), DIGITS)} | {number(r.get('mean_reward'), DIGITS)} | {number(r.get('val_mean_reward'), DIGITS)} |" for r in rows]
    notes = [f"- {r['model']}: {r['note']}" for r in rows if r.get("note")]
    return head + "\n".join(lines) + ("\n\n" + "\n".join(notes) if notes else "") + "\n"


def _evaluation(f: CardFacts) -> str:
    return (
        "## Evaluation\n\n"
        f"Greedy episodes on held-out tasks ({f.cfg.env.eval_tasks} test"
        + (f", {f.cfg.env.val_tasks} validation" if f.cfg.env.val_tasks else "")
        + f"), rounded to {DIGITS} decimals; `base` is the untrained base model.\n\n"
        + eval_table(f.rows, f.choice.tag)
    )


def _commands(f: CardFacts) -> str:
    run = f.run_command or "ipr run --config run.yaml   # run.yaml: the config above"
    return (
        "## How it was made\n\n"
        "```bash\n"
        f"{run}\n"
        f"{f.export_command}\n"
        "```\n\n"
        "The run command reproduces the run's config (from an ipr-flow checkout; add `--set storage.root=...` for another artifact root).\n"
    )


USAGE = """## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("PATH_OR_REPO")
model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")
messages = [{"role": "system", "content": "..."}, {"role": "user", "content": "the task and first observation"}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tok.decode(model.generate(**ids, max_new_tokens=64)[0][ids["input_ids"].shape[1]:]))
```

The agent answers `Thought: ...` then `Action: ...`; the environment's reply goes back as a user message `Observation: ...`.
"""


def model_card(f: CardFacts) -> str:
    title = f"# {f.cfg.run_name}: {f.choice.tag}\n\nAn LLM agent for `{f.cfg.env.name}` trained with IPR.\n"
    return "\n".join([front_matter(f.cfg), title, _method(f), _training(f.cfg), _data(f), _evaluation(f), _commands(f), USAGE])


def card_facts(cfg: IPRConfig, run: str, nodes: Sequence[Node], rows: Sequence[Mapping[str, Any]], choice: Choice, written: Mapping[str, Mapping[str, int]], commands: tuple[str | None, str]) -> CardFacts:
    """The card's facts: the run's experts and pair counts (from manifests), the exported rows, the two commands."""
    experts = read_trajectories(store.join(run, next(n for n in nodes if n.stage == "experts").key))
    counts: dict[int, dict[str, int]] = {}
    for n in _existing(run, nodes, "pairs"):
        counts[int(n.iteration)] = {k: int(v) for k, v in store.read_manifest(store.join(run, n.key)).meta.items() if k in ("outcome", "step")}
    return CardFacts(
        cfg=cfg, rows=rows, choice=choice, iterations_done=max(checkpoints(run, nodes)), experts=len(experts),
        experts_ok=sum(1 for e in experts if e.error is None and e.success), pair_counts=counts,
        dataset_rows={name: sum(files.values()) for name, files in written.items()}, run_command=commands[0], export_command=commands[1],
    )  # fmt: skip


# --- the whole export ------------------------------------------------------------------


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` at ``out`` (an existing ``out`` is moved aside first, removed last)."""
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}") if out.exists() else None
    if old is not None:
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old)


def default_export_command(run: str, out: Path, iteration: int | None, force: bool) -> str:
    it = "best" if iteration is None else str(iteration)
    return f"ipr export {shlex.quote(run)} --iteration {it} --out {shlex.quote(str(out))}" + (" --force" if force else "")


def export_run(
    cfg: IPRConfig,
    run: str,
    out: str | Path,
    iteration: str | int = "best",
    *,
    force: bool = False,
    command: str | None = None,
    base_file: Path | None = None,
) -> ExportResult:
    """Export ``run`` (its config ``cfg``) to ``out``: checked first, built in a
    temporary sibling, renamed into place last. ``command`` is the export command
    the card records; ``base_file`` the config the card's run command starts from."""
    out = Path(out).expanduser().resolve()
    it = parse_iteration(iteration)
    nodes = run_plan(cfg, run)
    rows = result_rows(run, nodes)
    choice = choose(run, nodes, rows, it)
    check_out(out, run, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        written = write_datasets(run, nodes, tmp / "datasets")
        copy_model(run, choice.key, tmp / "model")
        commands = (run_command(cfg, base_file), command or default_export_command(run, out, it, force))
        (tmp / "model" / "README.md").write_text(model_card(card_facts(cfg, run, nodes, rows, choice, written, commands)))
        files = tuple((p.relative_to(tmp / "model").as_posix(), p.stat().st_size) for p in sorted((tmp / "model").rglob("*")) if p.is_file())
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, choice, files, written)
