"""Stage 0 SFT: learns, is deterministic, saves a reloadable checkpoint, respects budgets
(steps: epochs / max_steps; the time cap: flagged when it cuts, an error before min_steps)."""

from __future__ import annotations

import json
import logging
import math

import pytest

torch = pytest.importorskip("torch")

from fake_env import SYSTEM, LineWorld, expert_steps, tiny_model  # noqa: E402
from ipr_core.config import SFTConfig  # noqa: E402
from ipr_core.policies.tiny import load_tokenizer  # noqa: E402
from ipr_core.training.common import Runtime, TargetScorer, TrainingError, load_model, score_segments  # noqa: E402
from ipr_core.training import loop  # noqa: E402
from ipr_core.training.sft import demonstration_segments, train_sft  # noqa: E402
from ipr_core.types import Trajectory  # noqa: E402

torch.set_num_threads(1)

CFG = SFTConfig(epochs=4, lr=2e-3, batch_size=4, warmup_ratio=0.0, max_length=512)


def cut_after(monkeypatch, steps: int) -> None:
    """Make the time cap (when one is set) run out after exactly ``steps``
    optimizer steps, whatever this machine's speed."""

    class CutAfter(loop.Budget):
        def __init__(self, max_time_s):
            super().__init__(max_time_s)
            self.checks = 0

        def spent(self) -> bool:
            self.checks += 1  # once before each step
            return self.max is not None and self.checks > steps

    monkeypatch.setattr(loop, "Budget", CutAfter)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def experts():
    env = LineWorld()
    out = []
    for task in env.list_tasks("train", 6):
        instruction, steps = expert_steps(env, task)
        out.append(Trajectory(f"expert-{task.task_id}", task, "expert", SYSTEM, instruction, tuple(steps), 0, 1.0, True, True))
    return out


def _nll(path, experts, history=1) -> float:
    """Mean NLL per target token of the experts under the model at ``path``."""
    tok = load_tokenizer(path)
    segs = [s for g in demonstration_segments(tok, experts, history, 512) for s in g]
    rt = Runtime.create("fp32")
    logp = score_segments(TargetScorer(load_model(path, rt.device).eval()), segs, tok.pad_token_id, rt)
    return -float(logp.sum()) / sum(s.n_targets for s in segs)


def test_sft_reduces_loss_and_saves_a_plain_checkpoint(base, experts, tmp_path):
    before = _nll(base, experts)
    result = train_sft(base, experts, CFG, 1, tmp_path / "sft", seed=0, precision="fp32")
    after = _nll(tmp_path / "sft", experts)
    assert result.steps == len(result.losses) > 5
    assert after < before - 0.5, (before, after)
    assert result.losses[-1] < result.losses[0]
    assert result.tokens > 0 and result.tokens_per_s > 0 and result.wall_s >= result.train_s > 0
    assert result.summary()["final_loss"] == result.losses[-1]
    json.dumps(result.summary())  # manifest metadata must be JSON
    # Plain transformers folder; the tokenizer reloads as the same class and encodes identically.
    files = {p.name for p in (tmp_path / "sft").iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files
    assert json.loads((tmp_path / "sft" / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    t0, t1 = load_tokenizer(base), load_tokenizer(tmp_path / "sft")
    text = experts[0].instruction + " 2 cells"
    assert t0(text)["input_ids"] == t1(text)["input_ids"] and t0.chat_template == t1.chat_template


def test_sft_is_deterministic_for_a_seed(base, experts, tmp_path):
    cfg = CFG.model_copy(update={"epochs": 1.0})
    a = train_sft(base, experts, cfg, 1, tmp_path / "a", seed=3, precision="fp32")
    b = train_sft(base, experts, cfg, 1, tmp_path / "b", seed=3, precision="fp32")
    c = train_sft(base, experts, cfg, 1, tmp_path / "c", seed=4, precision="fp32")
    assert a.losses == b.losses
    assert a.losses != c.losses  # another data order
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_grad_accumulation_is_a_proper_token_mean(base, experts, tmp_path):
    """4 segments at once == 2 x 2 accumulated: the step normalises by the
    target tokens of the whole step, not per micro-batch."""
    one = CFG.model_copy(update={"epochs": 0.1, "batch_size": 4, "grad_accum": 1})
    two = CFG.model_copy(update={"epochs": 0.1, "batch_size": 2, "grad_accum": 2})
    a = train_sft(base, experts, one, 1, tmp_path / "a", seed=1, precision="fp32")
    b = train_sft(base, experts, two, 1, tmp_path / "b", seed=1, precision="fp32")
    assert a.steps == b.steps == 1
    assert a.losses[0] == pytest.approx(b.losses[0], abs=1e-5)
    # The same gradient (its norm before clipping; per-micro-batch means would differ).
    assert a.history[0]["grad_norm"] == pytest.approx(b.history[0]["grad_norm"], rel=1e-5)


def test_sft_accepts_rows_of_trajectories_and_of_sft_messages(base, experts):
    from ipr_core.conversation import trajectory_messages

    tok = load_tokenizer(base)
    rows = [e.to_row() for e in experts]
    sft_rows = [{"messages": trajectory_messages(e.system, e.instruction, e.steps), "task_id": e.task.task_id, "traj_id": e.traj_id} for e in experts]
    want = demonstration_segments(tok, experts, 2, 512)
    assert demonstration_segments(tok, rows, 2, 512) == want == demonstration_segments(tok, sft_rows, 2, 512)
    with pytest.raises(ValueError, match="not a demonstration"):
        demonstration_segments(tok, [{"foo": 1}], 2, 512)


def test_max_steps_bounds_the_steps_and_the_lr_schedule(base, experts, tmp_path):
    cfg = CFG.model_copy(update={"epochs": 50.0, "max_steps": 3, "scheduler": "cosine"})
    result = train_sft(base, experts, cfg, 1, tmp_path / "s", seed=0, precision="fp32")
    assert result.steps == result.planned_steps == 3 and not result.cut_by_time
    # The cosine spans exactly the 3 steps that run, not 50 epochs' worth.
    want = [cfg.lr * 0.5 * (1 + math.cos(math.pi * i / 3)) for i in range(3)]
    assert result.series("lr") == pytest.approx(want)
    summary = result.summary()
    assert (summary["steps"], summary["planned_steps"], summary["cut_by_time"]) == (3, 3, False)
    assert "stopped_by_budget" not in summary
    few = train_sft(base, experts, CFG.model_copy(update={"epochs": 1.0, "max_steps": 1000}), 1, tmp_path / "e", seed=0, precision="fp32")
    assert few.steps == few.planned_steps < 1000  # epochs decide when they are fewer


def test_time_cap_cut_is_flagged_and_warned(base, experts, tmp_path, monkeypatch, caplog):
    cut_after(monkeypatch, 2)
    cfg = CFG.model_copy(update={"max_time_s": 30.0, "epochs": 50.0})
    with caplog.at_level(logging.WARNING):
        result = train_sft(base, experts, cfg, 1, tmp_path / "s", seed=0, precision="fp32", progress="sft/model")
    assert result.cut_by_time and result.steps == 2 < result.planned_steps
    summary = result.summary()
    assert summary["cut_by_time"] is True and summary["steps"] == 2 and summary["planned_steps"] == result.planned_steps
    assert f"SFT (sft/model): cut by max_time_s=30 s after 2/{result.planned_steps} planned steps" in caplog.text
    assert (tmp_path / "s" / "model.safetensors").exists()


def test_time_cap_cut_before_min_steps_is_an_error(base, experts, tmp_path, monkeypatch):
    cut_after(monkeypatch, 0)
    cfg = CFG.model_copy(update={"max_time_s": 1e-6, "epochs": 50.0})
    with pytest.raises(TrainingError, match=r"SFT: training was cut by max_time_s=1e-06 s after 0 of \d+ planned optimizer steps, fewer than min_steps=1"):
        train_sft(base, experts, cfg, 1, tmp_path / "s", seed=0, precision="fp32")
    assert not (tmp_path / "s" / "model.safetensors").exists()  # nothing passed on as trained
    cut_after(monkeypatch, 2)
    with pytest.raises(TrainingError, match="after 2 of .* min_steps=3"):
        train_sft(base, experts, cfg.model_copy(update={"min_steps": 3}), 1, tmp_path / "s", seed=0, precision="fp32")
    result = train_sft(base, experts, cfg.model_copy(update={"min_steps": 0}), 1, tmp_path / "z", seed=0, precision="fp32")
    assert result.cut_by_time and result.steps == 2  # min_steps=0: any cut is accepted (and flagged)


def test_sft_needs_an_expert_trajectory(base, tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        train_sft(base, [], CFG, 1, tmp_path / "x")


def test_precision_resolution_is_cpu_safe():
    rt = Runtime.create("auto")
    if not torch.cuda.is_available():
        assert rt.device.type == "cpu" and rt.dtype is None  # never bf16 autocast on CPU by default
    assert Runtime.create("fp32").dtype is None
    assert Runtime.create("bf16").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        Runtime.create("fp16")
