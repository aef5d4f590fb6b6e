"""mc.mode=reward_model on a real tiny BabyAI run: iteration 1's MC labels train
the reward model, iteration 2's agent branches are scored by it with no scorer
rollouts, and the stages are cached and resumed like the others."""

from __future__ import annotations

import pytest

from helpers import TINY_RUN
from ipr_core import store
from ipr_core.config import ConfigError, load_config
from ipr_core.pipeline import check, run_local, run_plan, run_uri
from ipr_core.pipeline import stages as stages_mod
from ipr_core.pipeline.summary import result_rows

RM = [*TINY_RUN, "env.train_tasks=3", "pipeline.iterations=2", "mc.mode=reward_model", "mc.reward_model_from=2", "mc.score_all_branches=true",
      "training.reward_model.epochs=2", "training.reward_model.lr=0.001", "training.reward_model.held_out=0.34", "pipeline.eval_base=false"]  # fmt: skip


@pytest.mark.slow
def test_reward_model_scores_iteration_two_without_rollouts_and_resumes(tmp_path, monkeypatch):
    pytest.importorskip("minigrid")
    from ipr_core.training.reward_model import context_of, load_reward_model, predict

    played: list[tuple[str, set]] = []  # (stage label, episode sources) of every episode batch that ran
    real = stages_mod._episodes

    def spy(ctx, model_uri, specs, temperature, on_episode=None):
        played.append((ctx.label, {s.source for s in specs}))
        return real(ctx, model_uri, specs, temperature, on_episode=on_episode)

    monkeypatch.setattr(stages_mod, "_episodes", spy)
    cfg = load_config(None, [*RM, f"storage.root={tmp_path}", "run_name=rm"])
    run_local(cfg)
    run = run_uri(cfg)

    scorer_batches = [label for label, sources in played if "scorer" in sources]
    assert any(label.startswith("iter-01/agent_mc") for label in scorer_batches)
    assert not any(label.startswith("iter-02") for label in scorer_batches), scorer_batches  # no agent MC in iteration 2
    assert not store.exists(store.join(run, "iter-02/agent_mc/shard-000"))

    # the model's rewards are what pairs used, and the checkpoint reloads with transformers and scores the same
    rows = store.read_rows(store.join(run, "iter-02/agent_rm_rewards"), "step_rewards")
    assert rows and all(r["n_rollouts"] == 0 for r in rows)
    rm_uri = store.join(run, "reward_model/model")
    model, tok = load_reward_model(store.read_checkpoint(rm_uri))
    targets = stages_mod._agent_targets(cfg, stages_mod._branches([store.join(run, f"iter-02/explore/shard-{s:03d}") for s in range(2)]), stages_mod.ipr_experts(cfg, stages_mod.read_trajectories(store.join(run, "experts/train"))))[0]
    scored = [t for t in targets if not stages_mod.ipr.is_last_step(t)]
    want = dict(zip([(t.branch_id, t.step) for t in scored], predict(model, tok, [context_of(t, cfg.sampling.history_turns) for t in scored], cfg.training.reward_model.max_length)))
    got = {(r["branch_id"], r["step"]): r["reward"] for r in rows if not r["is_last"]}
    assert got == pytest.approx(want) and len(got) == len(scored) > 0
    pairs = store.read_manifest(store.join(run, "iter-02/pairs"))
    assert store.join(run, "iter-02/agent_rm_rewards") in pairs.inputs

    # quality and cost in the iteration rows
    m = store.read_manifest(rm_uri)
    assert m.meta["train_labels"] > 0 and m.meta["held_out_labels"] > 0 and 0 <= m.meta["held_out_mae"] <= 1
    [it2] = [r for r in result_rows(run, run_plan(cfg, run)) if r["model"] == "iter-02"]
    assert it2["rm_scored"] == len(scored) and it2["rm_rollouts_avoided"] == cfg.mc.n_rollouts * len(scored)
    assert it2["rm_held_out_mae"] == m.meta["held_out_mae"] and it2["agent_mc_rollouts"] is None

    # cached and resumed like the other stages: a rerun computes nothing; a lost model is retrained alone
    played.clear()
    run_local(cfg)
    assert played == []
    import shutil

    shutil.rmtree(rm_uri, ignore_errors=True)
    run_local(cfg)
    assert [label for label, _ in played] == [], played  # retraining plays no episode
    again = store.read_manifest(rm_uri)
    assert again.digest == m.digest  # seeded: the same model
    assert store.read_manifest(store.join(run, "iter-02/pairs")).created_at == pairs.created_at  # downstream kept


def test_a_reward_model_no_iteration_uses_is_refused_up_front(tmp_path):
    pytest.importorskip("minigrid")
    with pytest.raises(ConfigError, match="mc.reward_model_from=3"):
        check(load_config(None, [*RM, f"storage.root={tmp_path}", "mc.reward_model_from=3"]))
    with pytest.raises(ConfigError, match="pairs.step_pairs"):
        check(load_config(None, [*RM, f"storage.root={tmp_path}", "pairs.step_pairs=false"]))
    with pytest.raises(ConfigError, match="mc.reward_model_experts=true needs mc.mode=reward_model"):
        check(load_config(None, [*RM, f"storage.root={tmp_path}", "mc.mode=hybrid", "mc.reward_model_experts=true"]))


@pytest.mark.slow
def test_the_model_can_score_the_expert_side_of_its_iterations_pairs_too(tmp_path):
    pytest.importorskip("minigrid")
    from ipr_core.training.reward_model import context_of, load_reward_model, predict

    cfg = load_config(None, [*RM, f"storage.root={tmp_path}", "run_name=both", "mc.reward_model_experts=true"])
    run_local(cfg)
    run = run_uri(cfg)
    ours, mc = store.join(run, "reward_model/expert_rewards"), store.join(run, "scorer/expert_rewards")
    assert ours in store.read_manifest(store.join(run, "iter-02/pairs")).inputs  # the model's iteration: its expert rewards
    assert mc in store.read_manifest(store.join(run, "iter-01/pairs")).inputs and ours not in store.read_manifest(store.join(run, "iter-01/pairs")).inputs

    rows = store.read_rows(ours, "step_rewards")
    experts = stages_mod.ipr_experts(cfg, stages_mod.read_trajectories(store.join(run, "experts/train")))
    targets = [t for t in stages_mod.ipr.expert_targets(experts) if not stages_mod.ipr.is_last_step(t)]
    model, tok = load_reward_model(store.read_checkpoint(store.join(run, "reward_model/model")))
    want = dict(zip([(t.branch_id, t.step) for t in targets], predict(model, tok, [context_of(t, cfg.sampling.history_turns) for t in targets], cfg.training.reward_model.max_length)))
    assert {(r["branch_id"], r["step"]): r["reward"] for r in rows if not r["is_last"]} == pytest.approx(want) and want
    mc_rows = {(r["branch_id"], r["step"]): r["reward"] for r in store.read_rows(mc, "step_rewards")}
    assert all(r["reward"] == mc_rows[(r["branch_id"], r["step"])] for r in rows if r["is_last"])  # last steps: the outcome, as MC's
    assert len(rows) == len(mc_rows)

    m = store.read_manifest(store.join(run, "reward_model/model"))
    [it2] = [r for r in result_rows(run, run_plan(cfg, run)) if r["model"] == "iter-02"]
    assert it2["rm_pair_agreement"] == m.meta["pair_agreement_both"]


@pytest.mark.slow
def test_hybrid_rolls_out_only_the_targets_it_names_and_merges(tmp_path, monkeypatch):
    pytest.importorskip("minigrid")
    played: list[tuple[str, int]] = []
    real = stages_mod._episodes

    def spy(ctx, model_uri, specs, temperature, on_episode=None):
        played.append((ctx.label, sum(s.source == "scorer" for s in specs)))
        return real(ctx, model_uri, specs, temperature, on_episode=on_episode)

    monkeypatch.setattr(stages_mod, "_episodes", spy)
    # a wide band, and no memo: every named target is rolled out here, and only those
    cfg = load_config(None, [*RM, f"storage.root={tmp_path}", "run_name=hy", "mc.mode=hybrid", "mc.hybrid_band=0.3", "mc.memo=false"])
    run_local(cfg)
    run = run_uri(cfg)
    experts = stages_mod.ipr_experts(cfg, stages_mod.read_trajectories(store.join(run, "experts/train")))
    rm_rewards, expert_rewards = store.join(run, "iter-02/agent_rm_rewards"), store.join(run, "scorer/expert_rewards")
    rolled, named, decided = set(), set(), set()
    for s in range(2):
        branches = stages_mod.read_trajectories(store.join(run, f"iter-02/explore/shard-{s:03d}"), "branches")
        near, far = stages_mod._near_decision(cfg, stages_mod._agent_targets(cfg, branches, experts)[0], store.read_rows(rm_rewards, "step_rewards"), expert_rewards, experts)
        named |= {(t.branch_id, t.step) for t in near}
        decided |= {(t.branch_id, t.step) for t in far if not stages_mod.ipr.is_last_step(t)}
        rolled |= {(r["branch_id"], int(r["step"])) for r in store.read_rows(store.join(run, f"iter-02/hybrid_mc/shard-{s:03d}"), "mc_rollouts")}
    assert rolled == named and named and decided, (len(named), len(decided))
    scorer_in_2 = sum(n for label, n in played if label.startswith("iter-02"))
    assert scorer_in_2 == cfg.mc.n_rollouts * len(named)  # what executed: N rollouts per named target, nothing else
    assert all(label.startswith("iter-02/hybrid_mc") for label, n in played if n and label.startswith("iter-02"))

    merged = {(r["branch_id"], int(r["step"])): r for r in store.read_rows(store.join(run, "iter-02/hybrid_rewards"), "step_rewards")}
    model = {(r["branch_id"], int(r["step"])): r for r in store.read_rows(rm_rewards, "step_rewards")}
    assert all(merged[k]["n_rollouts"] == cfg.mc.n_rollouts for k in named)
    assert all(merged[k] == model[k] for k in decided)
    [it2] = [r for r in result_rows(run, run_plan(cfg, run)) if r["model"] == "iter-02"]
    assert it2["rm_rollouts_avoided"] == cfg.mc.n_rollouts * len(decided) and it2["agent_mc_rollouts"] == cfg.mc.n_rollouts * len(named)
