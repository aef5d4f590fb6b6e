"""Generated ALFWorld games (ipr_core.envs.alfworld_gen) on the real engine (ipr_core.envs.alfworld_engine).

Few, small games: one module-wide generation (9 games) serves most checks.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("alfworld", reason="ALFWorld games need the alfworld package (pip install alfworld==0.4.2 'textworld[pddl]')")
pytest.importorskip("fast_downward", reason="ALFWorld's PDDL engine needs textworld[pddl] (fast-downward-textworld)")

from ipr_core.envs import alfworld_engine as engine  # noqa: E402
from ipr_core.envs import alfworld_gen as gen  # noqa: E402

COUNTS = {"train": 6, "valid_seen": 1, "valid_unseen": 2}
# sha256 of alfworld/data/alfred.twl2 and alfred.pddl at alfworld commit 9b73cd5 (the 0.3 text ETO and IPR used).
GRAMMAR_03_SHA256 = "d955e6db384c68ac5797e881b795fd36d788e87a03547f9a87e48fbd7c5b361b"
DOMAIN_03_SHA256 = "e64e8c0002648c403e05adedc25be5ea8b9863924f32cc7611051bed1f386e46"
# receptacleAtLocation of an official FloorPlan1 problem (json_2.1.1), for ids openable.json shares with it.
OFFICIAL_FLOORPLAN1 = {
    "Cabinet|+00.68|+00.50|-02.20": (0, -5, 2, 45), "Cabinet|+00.68|+02.02|-02.46": (2, -7, 2, -30),
    "Cabinet|+00.72|+02.02|-02.46": (4, -7, 2, -30), "Cabinet|-00.73|+02.02|-02.46": (-4, -7, 2, -30),
    "Cabinet|-01.18|+00.50|-02.20": (-5, -5, 2, 45), "Cabinet|-01.55|+00.50|+00.38": (-4, 2, 3, 60),
    "Cabinet|-01.55|+00.50|-01.97": (-3, -6, 3, 60), "Cabinet|-01.69|+02.02|-02.46": (-5, -7, 2, -30),
    "CounterTop|+00.69|+00.95|-02.48": (3, -7, 2, 45), "CounterTop|-00.08|+01.15|00.00": (3, 0, 3, 30),
    "CounterTop|-01.87|+00.95|-01.21": (-5, -7, 3, 45), "Drawer|+00.95|+00.22|-02.20": (6, -4, 2, 45),
    "Drawer|+00.95|+00.39|-02.20": (6, -4, 2, 45), "Drawer|+00.95|+00.56|-02.20": (2, -5, 2, 45),
    "Drawer|+00.95|+00.71|-02.20": (7, -7, 3, 45), "Drawer|+00.95|+00.83|-02.20": (1, -7, 1, 45),
    "Drawer|-01.56|+00.33|-00.20": (-4, 3, 2, 60), "Drawer|-01.56|+00.84|+00.20": (-4, 4, 2, 45),
    "Drawer|-01.56|+00.84|-00.20": (-4, -4, 0, 45), "Microwave|-00.24|+01.69|-02.53": (-1, -7, 2, 0),
    "Fridge|-02.10|+00.00|+01.09": (-4, 4, 3, 60),  # official id ...|+01.07: same pose
}


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[gen.GeneratedGame]]:
    out = tmp_path_factory.mktemp("alfworld")
    return out, gen.generate_games(out, seed=0, n=COUNTS, progress=False)


@pytest.fixture(scope="module")
def generated_03(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[gen.GeneratedGame]]:
    out = tmp_path_factory.mktemp("alfworld03")
    return out, gen.generate_games(out, seed=0, n={"train": 1}, task_types=["pick_and_place_simple"], grammar="0.3", progress=False)


def _replay(game_file: Path, commands: list[str]) -> dict:
    env = engine.open_game(game_file, expert=None)
    state = env.reset()
    for command in commands:
        state, _, _ = env.step(command)
    return state


def test_counts_layout_and_every_task_type(generated):
    out, games = generated
    assert [g.split for g in games] == [s for s in gen.SPLITS for _ in range(COUNTS[s])]
    assert {g.task_type for g in games if g.split == "train"} == set(gen.TASK_TYPES)
    for g in games:
        parts = Path(g.path).parts
        assert parts[0] == g.split and parts[-1] == "game.tw-pddl" and parts[-2].startswith("trial_G0_")
        task_type, obj, mrecep, target, scene = parts[1].split("-")
        assert (task_type, mrecep, int(scene)) == (g.task_type, "None", g.scene)
        data = json.loads((out / g.path).read_text())
        assert set(data) == {"pddl_domain", "grammar", "pddl_problem", "solvable", "walkthrough"}
        assert data["solvable"] is True and len(data["walkthrough"]) == g.walkthrough_len > 0
        assert "UNKNOWN GOAL" not in data["grammar"] and f"Your task is to: {g.goal}." in data["grammar"]
        traj = json.loads((out / g.path).with_name("traj_data.json").read_text())
        assert traj["generated"] is True and traj["generator"]["seed"] == 0 and traj["generator"]["version"] == gen.GEN_VERSION
        assert traj["task_type"] == g.task_type and traj["scene"]["floor_plan"] == f"FloorPlan{g.scene}"
        params = traj["pddl_params"]
        assert set(params) == {"object_target", "parent_target", "toggle_target", "mrecep_target", "object_sliced"}
        assert params["object_target"] == obj and target == (params["parent_target"] or params["toggle_target"])


def test_every_game_is_won_by_its_walkthrough(generated):
    out, games = generated
    for g in games:
        walkthrough = json.loads((out / g.path).read_text())["walkthrough"]
        assert _replay(out / g.path, walkthrough)["won"], g.path


def test_valid_unseen_scenes_are_disjoint_from_train(generated):
    _, games = generated
    unseen = {g.scene for g in games if g.split == "valid_unseen"}
    seen = {g.scene for g in games if g.split != "valid_unseen"}
    assert unseen <= set(gen.UNSEEN_SCENES) and not seen & set(gen.UNSEEN_SCENES)
    with pytest.raises(ValueError, match="held out"):
        gen.generate_games("/nonexistent", seed=0, n=1, scenes=[1, 10])


def test_valid_seen_games_differ_from_train(generated):
    out, games = generated
    problems = [json.loads((out / g.path).read_text())["pddl_problem"].split("(:objects", 1)[1] for g in games]
    assert len(set(problems)) == len(problems)


def test_same_seed_same_bytes_and_prefix_stable(generated, tmp_path):
    out, games = generated
    again = gen.generate_games(tmp_path, seed=0, n={"train": 2}, progress=False)
    assert again == [g for g in games if g.split == "train"][:2]
    tree = _tree(tmp_path)
    assert tree and tree == {k: v for k, v in _tree(out).items() if k in tree}


def test_a_different_seed_gives_different_games(generated, tmp_path):
    out, games = generated
    other = gen.generate_games(tmp_path, seed=3, n={"train": 1}, progress=False)
    mine = json.loads((out / games[0].path).read_text())["pddl_problem"]
    theirs = json.loads((tmp_path / other[0].path).read_text())["pddl_problem"]
    assert mine != theirs


def test_grammar_04_moves_and_invalid_commands_do_nothing(generated):
    out, games = generated
    g = next(g for g in games if g.task_type == "pick_and_place_simple")
    walkthrough = json.loads((out / g.path).read_text())["walkthrough"]
    state = _replay(out / g.path, walkthrough[:-1])
    last = walkthrough[-1]
    assert last.startswith("move ") and " to " in last and last in state["admissible_commands"]
    assert not any(c.startswith("put ") for c in state["admissible_commands"])
    env = engine.open_game(out / g.path, expert=None)
    env.reset()
    assert env.step("dance with the fridge")[0]["feedback"] == "Nothing happens."


def test_grammar_03_puts_in_on_and_arrives_at_locs(generated_03):
    out, games = generated_03
    walkthrough = json.loads((out / games[0].path).read_text())["walkthrough"]
    state = _replay(out / games[0].path, walkthrough[:-1])
    last = walkthrough[-1]
    assert last.startswith("put ") and " in/on " in last and last in state["admissible_commands"]
    assert not any(c.startswith("move ") for c in state["admissible_commands"])
    env = engine.open_game(out / games[0].path, expert=None)
    env.reset()
    arrive = next(c for c in walkthrough if c.startswith("go to"))
    assert env.step(arrive)[0]["feedback"].startswith("You arrive at loc ")
    assert env.step("help")[0]["feedback"] == "Nothing happens."  # 0.3 had no help action
    won, _, _ = _replay_final(out / games[0].path, walkthrough)
    assert won["won"] and won["feedback"].startswith("You put the ")


def _replay_final(game_file: Path, walkthrough: list[str]):
    env = engine.open_game(game_file, expert=None)
    env.reset()
    for command in walkthrough[:-1]:
        env.step(command)
    return env.step(walkthrough[-1])


def test_grammar_03_and_04_give_the_same_games(generated, generated_03):
    (out, games), (out_03, games_03) = generated, generated_03
    assert games_03[0].path == games[0].path  # same draws: game 0 of train is pick_and_place_simple in both
    data, data_03 = (json.loads((o / g.path).read_text()) for o, g in ((out, games[0]), (out_03, games_03[0])))
    assert data["pddl_problem"] == data_03["pddl_problem"]
    assert [engine.as_03(c) for c in data["walkthrough"]] == data_03["walkthrough"]


def test_grammar_03_is_alfworld_03_text():
    domain, grammar = gen.logic("0.3")
    assert hashlib.sha256(grammar.encode()).hexdigest() == GRAMMAR_03_SHA256
    assert hashlib.sha256(domain.encode()).hexdigest() == DOMAIN_03_SHA256


def test_receptacle_locations_follow_the_official_rule():
    scene = gen.load_scene(1)
    locs = {r.id: r.loc for r in scene.receptacles}
    assert {k: locs[k] for k in OFFICIAL_FLOORPLAN1} == OFFICIAL_FLOORPLAN1


def test_the_stock_alfworld_loader_finds_the_games(generated):
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    out, games = generated
    config = {"env": {"goal_desc_human_anns_prob": 0, "task_types": [1, 2, 3, 4, 5, 6]},
              "dataset": {"data_path": str(out / "train"), "eval_id_data_path": str(out / "valid_seen"),
                          "eval_ood_data_path": str(out / "valid_unseen"), "num_train_games": -1, "num_eval_games": -1}}
    for split, train_eval in (("train", "train"), ("valid_seen", "eval_in_distribution"), ("valid_unseen", "eval_out_of_distribution")):
        found = AlfredTWEnv(config, train_eval=train_eval).game_files
        assert sorted(found) == sorted(str(out / g.path) for g in games if g.split == split)


def test_expert_is_seeded_and_leaves_global_state_alone(generated):
    out, games = generated
    g = next(g for g in games if g.task_type == "pick_two_obj_and_place")  # needs the put->move fix
    argv, rng_state = list(sys.argv), random.getstate()
    first = engine.expert_walkthrough(out / g.path, seed=3)
    assert first is not None and first == engine.expert_walkthrough(out / g.path, seed=3)
    assert sys.argv == argv and random.getstate() == rng_state
    assert _replay(out / g.path, first)["won"]


def test_expert_plan_is_given_in_the_games_own_grammar(generated_03):
    out, games = generated_03
    env = engine.open_game(out / games[0].path, expert="handcoded", seed=0)
    state = env.reset()
    plans = []
    while not state["won"] and len(plans) < 100:
        plans.append(state["extra.expert_plan"][0])
        state, _, _ = env.step(plans[-1])
    assert state["won"] and plans[-1].startswith("put ") and " in/on " in plans[-1]
    with pytest.raises(ValueError, match="unknown ALFWorld expert"):
        engine.open_game(out / games[0].path, expert="oracle")


def test_fast_reset_plays_exactly_like_the_stock_engine(generated):
    """open_game's reset restores the loaded state instead of translating the PDDL again: same episodes as PddlEnv's."""
    out, games = generated
    g = next(g for g in games if g.task_type == "pick_heat_then_place_in_recep")
    walkthrough = json.loads((out / g.path).read_text())["walkthrough"]
    m = engine.import_alfworld()
    stock = m["AlfredInfos"](m["AlfredDemangler"](m["PddlEnv"](m["textworld"].EnvInfos(won=True, admissible_commands=True)), shuffle=False))

    def episode(env) -> list:
        state = env.reset()
        seen = [(state["feedback"], state["admissible_commands"], sorted(map(str, env.unwrapped._pddl_state.facts)))]
        for command in walkthrough + ["look"]:
            state, _, _ = env.step(command)
            seen.append((state["feedback"], state["admissible_commands"], state["won"], sorted(map(str, env.unwrapped._pddl_state.facts))))
        return seen

    with engine.keep_argv():
        stock.load(str(out / g.path))
        expected = episode(stock)
    fast = engine.open_game(out / g.path, expert=None)
    assert episode(fast) == expected and episode(fast) == expected  # the second reset starts clean too
    assert expected[-2][2] is True


def test_cli_writes_the_official_layout_and_refuses_to_overwrite(tmp_path):
    import subprocess

    from conftest import ROOT

    ipr = [sys.executable, "-m", "ipr_cli.main", "data", "alfworld-games", "--out", str(tmp_path / "games")]
    done = subprocess.run(ipr + ["--n", "train=2", "--task-types", "pick_and_place_simple", "--max-expert-steps", "20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    listing = json.loads((tmp_path / "games" / "games.json").read_text())
    assert len(listing["games"]) == 2 and listing["seed"] == 0 and listing["generator"] == gen.GEN_VERSION
    assert sorted(p.name for p in (tmp_path / "games").iterdir()) == ["games.json", "json_2.1.1"]  # no partial folder left
    assert len(list((tmp_path / "games" / "json_2.1.1" / "train").glob("*/*/game.tw-pddl"))) == 2
    again = subprocess.run(ipr + ["--n", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and again.stderr.strip().splitlines()[-1].startswith("ipr: error: --out ")
    bad = subprocess.run(ipr[:-1] + [str(tmp_path / "other"), "--n", "train=two"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "ipr: error: --n 'train=two'" in bad.stderr and not (tmp_path / "other" / "json_2.1.1").exists()
