"""Losses by hand, and which tokens carry weight (targets vs context)."""

from __future__ import annotations

import logging
import math

import pytest

torch = pytest.importorskip("torch")

from fake_env import SYSTEM, LineWorld, expert_steps, tiny_model  # noqa: E402
from ipr_core.conversation import render_context, trajectory_messages  # noqa: E402
from ipr_core.policies.tiny import load_tokenizer  # noqa: E402
from ipr_core.training.data import IGNORE, TemplateError, collate, encode_conversation, encode_segment  # noqa: E402
from ipr_core.training.losses import dpo_loss, implicit_rewards, ipr_loss, sequence_logps, target_logps  # noqa: E402

torch.set_num_threads(1)


# --- pure losses -------------------------------------------------------------------------


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    # beta * [(−10 + 12) − (−11 + 11)] = 0.1 * 2 = 0.2; −log σ(0.2) = log(1 + e^−0.2)
    assert dpo_loss(pc, pr, rc, rr, 0.1).item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-7)
    # policy == reference: log 2 whatever the log-probs
    x = torch.tensor([-3.0, -50.0])
    assert torch.allclose(dpo_loss(x, x - 7, x, x - 7, 0.5), torch.full((2,), math.log(2.0)))
    assert torch.allclose(implicit_rewards(torch.tensor([-1.0]), torch.tensor([-3.0]), 0.1), torch.tensor([0.2]))


def test_ipr_loss_weights_each_term_by_its_own_mean():
    per_pair = torch.tensor([1.0, 2.0, 3.0, 6.0])
    is_outcome = torch.tensor([True, False, False, False])
    got = ipr_loss(per_pair, is_outcome, torch.tensor(10.0), n_outcome=1, n_step=3, n_sft_tokens=5, w_outcome=2.0, w_step=0.5, w_sft=3.0)
    assert got.item() == pytest.approx(2.0 * 1.0 + 0.5 * (11.0 / 3) + 3.0 * (10.0 / 5))
    # Split into two micro-batches with global counts: the sum is the same loss.
    a = ipr_loss(per_pair[:2], is_outcome[:2], torch.tensor(4.0), n_outcome=1, n_step=3, n_sft_tokens=5, w_outcome=2.0, w_step=0.5, w_sft=3.0)
    b = ipr_loss(per_pair[2:], is_outcome[2:], torch.tensor(6.0), n_outcome=1, n_step=3, n_sft_tokens=5, w_outcome=2.0, w_step=0.5, w_sft=3.0)
    assert (a + b).item() == pytest.approx(got.item())
    # A kind absent from the step contributes 0 (not NaN).
    only_step = ipr_loss(per_pair[1:], is_outcome[1:], torch.tensor(0.0), n_outcome=0, n_step=3, n_sft_tokens=0, w_outcome=2.0, w_step=1.0, w_sft=3.0)
    assert only_step.item() == pytest.approx(11.0 / 3)


def test_sequence_logps_by_hand_and_zero_gradient_off_target():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]]], requires_grad=True)
    labels = torch.tensor([[IGNORE, 2, IGNORE, 0]])  # targets: token 1 (= 2) from position 0, token 3 (= 0) from position 2
    lse0 = math.log(1 + math.e + math.e**2)
    lse2 = math.log(2 + math.e**3)
    expected = (2.0 - lse0) + (0.0 - lse2)
    got = sequence_logps(logits, labels)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    got.sum().backward()
    # Positions 1 and 3 predict context tokens (or nothing): exactly no gradient.
    assert torch.all(logits.grad[0, 1] == 0) and torch.all(logits.grad[0, 3] == 0)
    assert torch.all(logits.grad[0, 0] != 0) and torch.all(logits.grad[0, 2] != 0)
    assert target_logps(torch.zeros(1, 4), torch.tensor([3])).item() == pytest.approx(-math.log(4))


# --- target masks --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def episode():
    env = LineWorld()
    instruction, steps = expert_steps(env, env.list_tasks("train", 8)[1])
    assert len(steps) >= 2
    return instruction, steps


def _targets_by_turn(tok, e):
    """Decoded runs of consecutive target tokens."""
    runs, cur = [], []
    for i, t in zip(e.input_ids, e.target):
        if t:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_only_assistant_content_and_end_of_turn_are_targets(tok, episode):
    instruction, steps = episode
    msgs = trajectory_messages(SYSTEM, instruction, steps)
    (seg,), lost = encode_conversation(tok, msgs, 2, None, 4096)
    assert lost == 0
    assert _targets_by_turn(tok, seg) == [s.assistant_text() + "<|im_end|>" for s in steps]
    # Same mask as transformers' own assistant mask from the {% generation %} markers.
    hf = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert list(hf["input_ids"][len(seg) :]) == tok("\n", add_special_tokens=False)["input_ids"]  # trailing newline trimmed
    assert list(seg.input_ids) == list(hf["input_ids"][: len(seg)])
    assert [int(t) for t in seg.target] == list(hf["assistant_masks"][: len(seg)])
    # No observation, system or instruction token is a target.
    context = tok.decode([i for i, t in zip(seg.input_ids, seg.target) if not t])
    for s in steps[:-1]:
        assert s.observation in context
    assert SYSTEM in context and instruction in context


def test_prefix_assistant_turns_of_a_step_pair_are_context(tok, episode):
    instruction, steps = episode
    msgs = trajectory_messages(SYSTEM, instruction, steps)
    prompt = msgs[:4]  # expert prefix e_{1:1}: system, instruction, a_1, o_1
    (seg,), _ = encode_conversation(tok, msgs, len(prompt), None, 4096)
    assert _targets_by_turn(tok, seg) == [s.assistant_text() + "<|im_end|>" for s in steps[1:]]


def test_windowed_segments_see_exactly_the_generation_context(tok, episode):
    instruction, steps = episode
    msgs = trajectory_messages(SYSTEM, instruction, steps)
    segs, _ = encode_conversation(tok, msgs, 2, 1, 4096)
    assert len(segs) == len(steps)
    for t, seg in enumerate(segs):
        ctx = render_context(SYSTEM, instruction, steps[:t], history=1)  # what the policy saw at step t
        prompt_ids = tok.apply_chat_template(ctx, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        first = seg.target.index(True)
        assert list(seg.input_ids[:first]) == list(prompt_ids)
        assert _targets_by_turn(tok, seg) == [steps[t].assistant_text() + "<|im_end|>"]


def test_left_truncation_keeps_whole_target_turns(tok, episode, caplog):
    instruction, steps = episode
    msgs = trajectory_messages(SYSTEM, instruction, steps)
    (full,), _ = encode_conversation(tok, msgs, 2, None, 4096)
    start = len(full) - 1  # first token of the last target turn
    while full.target[start - 1]:
        start -= 1
    last_turn = len(full) - start
    # Room for the last turn and a bit of context, not for the first turn.
    seg = encode_segment(tok, msgs, [m["role"] == "assistant" and i >= 2 for i, m in enumerate(msgs)], last_turn + 5)
    assert len(seg) == last_turn + 5 and seg.input_ids == full.input_ids[-(last_turn + 5) :]
    assert seg.dropped_turns == len(steps) - 1
    assert _targets_by_turn(tok, seg) == [steps[-1].assistant_text() + "<|im_end|>"]
    # A target that alone exceeds max_length: skipped, counted, never half-trained.
    segs, lost = encode_conversation(tok, msgs, 2, 1, 8)
    assert segs == [] and lost == len(steps)
    from ipr_core.training.sft import demonstration_segments
    from ipr_core.types import Task, Trajectory

    with caplog.at_level(logging.WARNING):
        traj = Trajectory("x", Task("t", "lineworld", "train", 0), "expert", SYSTEM, instruction, tuple(steps))
        assert demonstration_segments(tok, [traj], 1, 8) == []
    assert "longer than max_length=8" in caplog.text


def test_any_template_without_generation_markers(model_dir, episode):
    """A template with no {% generation %} markers and no newline after the
    last turn: the target ends at the end-of-turn token."""
    instruction, steps = episode
    t2 = load_tokenizer(model_dir)
    t2.chat_template = NO_MARKERS_TEMPLATE
    msgs = trajectory_messages(SYSTEM, instruction, steps)
    (seg,), _ = encode_conversation(t2, msgs, 2, None, 4096)
    assert _targets_by_turn(t2, seg) == [s.assistant_text() + "<|im_end|>" for s in steps]
    t2.chat_template = "{{ messages|length }}" + NO_MARKERS_TEMPLATE  # rewrites earlier text as turns are added
    with pytest.raises(TemplateError, match="not incremental"):
        encode_conversation(t2, msgs, 2, None, 4096)


def test_collate_pads_right_and_ignores_context(tok, episode):
    instruction, steps = episode
    segs, _ = encode_conversation(tok, trajectory_messages(SYSTEM, instruction, steps), 2, 1, 4096)
    ids, mask, labels = collate(segs, tok.pad_token_id)
    for i, s in enumerate(segs):
        assert mask[i].sum() == len(s) and torch.all(ids[i, len(s) :] == tok.pad_token_id)
        assert [int(x) for x in labels[i, : len(s)]] == [t if f else IGNORE for t, f in zip(s.input_ids, s.target)]
        assert torch.all(labels[i, len(s) :] == IGNORE)


# ChatML with "\n" between turns instead of after each: no generation markers,
# and a conversation ends right after <|im_end|> (as TRL's completions then do).
NO_MARKERS_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '\\n<|im_start|>assistant\\n' }}{%- endif %}"
)
