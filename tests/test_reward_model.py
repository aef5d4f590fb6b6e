"""The learned step reward model (paper Table 5) alone: labels from MC step
rewards, the head trained by MSE on a tiny model, reloading with transformers."""

from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from fake_env import SYSTEM, LineWorld, tiny_model  # noqa: E402
from ipr_core.config import RewardModelConfig  # noqa: E402
from ipr_core.ipr import MCTarget  # noqa: E402
from ipr_core.training.reward_model import held_out_split, labeled_steps, load_reward_model, predict, train_reward_model  # noqa: E402
from ipr_core.types import Step, Trajectory  # noqa: E402


def _walks(n_tasks: int, seed: int = 0) -> list[Trajectory]:
    """Random walks of 3 steps on LineWorld tasks (real observations), not finished."""
    env, rng, out = LineWorld(max_steps=20), random.Random(seed), []
    for task in env.list_tasks("train", n_tasks):
        instruction = env.reset(task)
        steps = []
        for _ in range(3):
            a = rng.choice(["left", "right"])
            r = env.step(a)
            steps.append(Step(f"I go {a}.", a, r.observation, r.reward))
            if r.done:
                break
        out.append(Trajectory(f"w-{task.task_id}", task, "agent", SYSTEM, instruction, tuple(steps)))
    return out


def synthetic(step: Step) -> float:
    """The step reward the head must learn: decided by the action of the scored step."""
    return 0.85 if step.action == "right" else 0.15


def _labels(trajs):
    targets = [MCTarget(t.traj_id, t, k) for t in trajs for k in range(1, len(t.steps) + 1)]
    rows = [{"branch_id": tg.branch_id, "task_id": tg.traj.task.task_id, "step": tg.step, "reward": synthetic(tg.traj.steps[tg.step - 1]), "n_rollouts": 4, "is_last": False} for tg in targets]
    return targets, rows


def test_labels_join_mc_rewards_to_the_scorers_context_and_skip_last_steps():
    trajs = _walks(3)
    targets, rows = _labels(trajs)
    rows[0] = {**rows[0], "is_last": True, "n_rollouts": 0}  # an outcome, not an estimate
    got = labeled_steps(targets, rows, history=1)
    assert len(got) == len(targets) - 1
    first = got[0]
    assert first.target_id == f"{targets[1].branch_id}#{targets[1].step}" and first.reward == rows[1]["reward"]
    # the context ends with the scored step and its observation, within the history window
    assert first.messages[-2]["content"].endswith(f"Action: {targets[1].traj.steps[1].action}")
    assert first.messages[-1]["content"] == "Observation: " + targets[1].traj.steps[1].observation
    train, held = held_out_split(got, 0.5, seed=1)
    assert {x.task_id for x in train}.isdisjoint({x.task_id for x in held}) and len(train) + len(held) == len(got)
    assert held_out_split(got, 0.5, seed=1) == (train, held)


def test_the_head_learns_a_synthetic_step_reward_and_reloads_with_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    torch.set_num_threads(1)
    model_dir = tiny_model(tmp_path / "tiny", hidden_size=32)
    targets, rows = _labels(_walks(40))
    train, held = held_out_split(labeled_steps(targets, rows, history=1), 0.25, seed=0)
    assert len(held) >= 12 and len(train) >= 60
    cfg = RewardModelConfig(epochs=20, lr=1e-3, batch_size=16, warmup_ratio=0.0)  # ~120 steps: the head breaks out of the mean around step 60
    out = tmp_path / "rm"
    res = train_reward_model(model_dir, train, held, cfg, 256, out, seed=0)
    mse = res.train.series("mse")
    assert sum(mse[-3:]) / 3 < 0.5 * sum(mse[:3]) / 3, mse  # the loss falls
    # Bound: predicting the mean label (0.5) everywhere errs by 0.35; the head must do far better on unseen tasks.
    assert res.held_out_error["mae"] < 0.1, res.summary()
    model, tok = load_reward_model(out)
    assert predict(model, tok, [x.messages for x in held], 256) == pytest.approx(
        [min(1.0, max(0.0, res_v)) for res_v in _plain_transformers_scores(out, tok, held)], abs=1e-5
    )
    again = train_reward_model(model_dir, train, held, cfg, 256, tmp_path / "rm2", seed=0)
    assert again.held_out_error == res.held_out_error  # seeded: the same model twice
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(str(out)), torch.nn.Module)


def _plain_transformers_scores(path, tok, labels) -> list[float]:
    """Scores through transformers' own forward (its pooling, its head), one row at a time."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(path)).eval()
    out = []
    with torch.no_grad():
        for x in labels:
            text = tok.apply_chat_template(list(x.messages), tokenize=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -256:]
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return out


def test_near_step_decision_is_the_step_margin_near_tau_in_the_outcomes_direction():
    from ipr_core.ipr import near_step_decision

    # expert won on outcome by more than tau_o: the step pair needs r_e - r_a > tau_s = 0.1
    assert near_step_decision(0.8, 0.65, 1.0, 0.0, 0.1, 0.1, band=0.1)  # margin 0.15: 0.05 from tau_s
    assert not near_step_decision(0.8, 0.2, 1.0, 0.0, 0.1, 0.1, band=0.1)  # margin 0.6: clearly a pair
    assert not near_step_decision(0.2, 0.8, 1.0, 0.0, 0.1, 0.1, band=0.1)  # clearly none
    # the agent won on outcome: the direction flips
    assert near_step_decision(0.6, 0.75, 0.0, 1.0, 0.1, 0.1, band=0.1) and not near_step_decision(0.75, 0.6, 0.0, 1.0, 0.1, 0.1, band=0.1)
    # outcomes within tau_o: no step reward makes a pair
    assert not near_step_decision(0.8, 0.7, 0.5, 0.55, 0.1, 0.1, band=1.0)


def test_pair_agreement_with_the_model_on_the_agent_side_or_on_both():
    from ipr_core.training.reward_model import Labeled, pair_agreement

    def lab(tid: str, reward: float) -> Labeled:
        return Labeled(tid, "t", (), reward)

    # expert e1's step 2 (MC 0.9) against two agent branches at that step (MC 0.2 and 0.85); tau_s = 0.1
    labels = [lab("e1#2", 0.9), lab("it01|e1|j1#2", 0.2), lab("it01|e1|j1b#2", 0.85)]
    mc_expert = {("e1", 2): 0.9}
    # the model: expert step 0.5 (too low), agents 0.3 and 0.45
    got = pair_agreement([0.5, 0.3, 0.45], labels, mc_expert, 0.1)
    # agent side only: 0.9 vs 0.3 -> expert wins (MC: expert wins) = agree; 0.9 vs 0.45 -> expert (MC: neither) = disagree
    # both sides: 0.5 vs 0.3 -> expert (agree); 0.5 vs 0.45 -> neither (MC: neither) = agree
    assert got == {"pair_agreement": 0.5, "pair_agreement_both": 1.0, "pair_n": 2}
    # an expert step the model did not score (not held out, or a last step) keeps MC's reward on both sides
    assert pair_agreement([0.3, 0.45], labels[1:], mc_expert, 0.1)["pair_agreement_both"] == 0.5
