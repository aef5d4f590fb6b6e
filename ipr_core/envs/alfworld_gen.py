"""Deterministic, seeded ALFWorld games built from what the alfworld wheel ships (no download).

The official games (``alfworld-download``) cannot be fetched here, so this
module writes games in their layout, playable by the stock engine and by
``alfworld_engine.open_game``::

    out_dir/<split>/<task_type>-<Object>-<MRecep|None>-<Parent|Toggle>-<scene>/trial_G<seed>_<index>/
        game.tw-pddl     {pddl_domain, grammar, pddl_problem, solvable, walkthrough}
        traj_data.json   task_type, pddl_params, scene.floor_plan, "generated": true, generator

``out_dir`` plays the role of ``$ALFWORLD_DATA/json_2.1.1`` (pass that path
for a drop-in; splits ``train``, ``valid_seen``, ``valid_unseen``).

How a game is made (the ALFRED/ALFWorld generators' rules where the wheel has
their inputs): the scene's receptacles and their interaction poses come from
``gen/layouts/FloorPlanN-openable.json``, turned into ``loc|x|z|rot|horizon``
by a port of ALFRED's ``get_obj_coords`` (rotation and horizon toward the
receptacle centre encoded in its THOR id, from a camera at THOR's agent height
plus ``CAMERA_HEIGHT_OFFSET``); objects of the types ``-objects.json`` lists
are placed 1-3 per type by the affordance priors (``VAL_RECEPTACLE_OBJECTS``);
the task is a feasible one of its type (``GOALS_VALID`` scene kinds; targets
not already satisfied: no target object starts in a receptacle of the parent
type); a free start pose (not at a receptacle, horizon 30); the goal PDDL from
``goal_library`` and a templated sentence; the problem written as ALFWorld's
``augment_pddl_states.py`` writes it. A game is kept only if the (fixed,
seeded) handcoded expert wins it; its commands become the ``walkthrough``.

Splits: ``valid_unseen`` draws only from ``unseen_scenes`` (ALFRED's
valid_unseen scenes 10, 219, 308, 424 by default), which ``train`` and
``valid_seen`` never use; ``valid_seen`` uses train's scenes with its own
draws (a different seed stream, so different games). Task types rotate
round-robin within a split (game k gets type k mod len(task_types)), so a few
games per split already cover every type.

Determinism: game k of a split depends only on (GEN_VERSION, alfworld's
version, seed, split, k, task types, scene pool, max_steps): every draw comes
from ``random.Random(derive_seed(...))`` over sorted inputs and the files are
written with sorted keys, so the same call gives byte-identical files and
``n=5`` is a prefix of ``n=10``. Grammars "0.3" and "0.4" give the same games
(same problem, walkthrough differing only in ``put X in/on Y``).

How generated games differ from the official ones:
- Object counts and placements are sampled from the priors, not read from the
  THOR scene; object coordinates are made up near their receptacle (their
  ``loc`` follows the official nearest-point rule from those coordinates).
- Receptacles the wheel lists for a scene but without poses in openable.json
  (coffee machines, toasters, stove burners in every kitchen, garbage cans in
  85 scenes, some drawers/shelves/holders) get guessed counts (stove burners 4,
  drawers/shelves/cabinets 2, others 1), ids and poses, fixed per scene; each
  gets a location of its own; openable classes are marked openable (the
  official rule drops openability without a precomputed pose).
- Lamps (look_at_obj_in_light) stand on a desk/side table/dresser-like
  receptacle: ToggleObject needs the lamp inside a receptacle.
- No sliced-object, movable-receptacle (``pick_and_place_with_movable_recep``)
  or human-annotated goals (ALFWorld's default is templated goals anyway);
  nothing starts inside a movable receptacle, hot, clean, open or switched on.
- The official 140 seen / 134 unseen evaluation games cannot be rebuilt:
  scores on these games are "ALFWorld engine, generated tasks", not comparable
  with published ALFWorld numbers.

Grammar ``"0.3"`` reproduces, byte for byte, the domain and grammar of
alfworld <= 0.3 (commit 9b73cd5, the text ETO and IPR used): ``put X in/on Y``,
"You put the X in/on the Y.", "You arrive at loc N.", and no ``help`` action.
It is the wheel's files with scripts/patch_tw-pddl.py (0.3 -> 0.4) undone.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterator, Mapping, Sequence

from tqdm import tqdm

from ipr_core.envs import alfworld_engine as engine
from ipr_core.seeding import derive_seed

GEN_VERSION = "1"
TASK_TYPES = ("pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place")
SPLITS = ("train", "valid_seen", "valid_unseen")
UNSEEN_SCENES = (10, 219, 308, 424)
GRAMMARS = ("0.4", "0.3")
# THOR's agent y in ALFRED's scenes; the camera sits CAMERA_HEIGHT_OFFSET above it.
AGENT_HEIGHT = 0.9009995
START_HORIZON = 30  # ALFRED's init_action horizon
MAX_ATTEMPTS = 40   # candidates per game before giving up (the expert wins most first tries)
# Which receptacle kinds a lamp may stand on (it must be "in" one to be toggled).
_LAMP_STANDS = ("Desk", "SideTable", "Dresser", "CoffeeTable", "Shelf", "TVStand")
LAMP_HOSTS = {"DeskLamp": _LAMP_STANDS, "FloorLamp": _LAMP_STANDS}
# Guesses for receptacles missing from openable.json: how many, and how high (m).
GUESSED_COUNT = {"StoveBurner": 4, "Drawer": 2, "Shelf": 2, "Cabinet": 2}
GUESSED_HEIGHT = {"StoveBurner": 0.92, "Toaster": 0.9, "CoffeeMachine": 0.9, "GarbageCan": 0.0, "TowelHolder": 1.1,
                  "HandTowelHolder": 1.6, "ToiletPaperHanger": 0.7, "Toilet": 0.0, "LaundryHamper": 0.0, "Ottoman": 0.0,
                  "Safe": 0.0, "SinkBasin": 0.9, "BathtubBasin": 0.4}
_PLACE_ACTION = {"pick_clean_then_place_in_recep": ("Cleanable", "SinkBasin"),
                 "pick_heat_then_place_in_recep": ("Heatable", "Microwave"),
                 "pick_cool_then_place_in_recep": ("Coolable", "Fridge")}
_MANGLE = {"-": "_minus_", "#": "-", "|": "_bar_", "+": "_plus_", ".": "_dot_", ",": "_comma_"}

Loc = tuple[int, int, int, int]


@dataclass(frozen=True)
class GeneratedGame:
    """One kept game; ``path`` is its game.tw-pddl relative to out_dir ('/'-separated)."""

    path: str
    split: str
    task_type: str
    scene: int
    walkthrough_len: int
    goal: str


@dataclass(frozen=True)
class _Thing:
    """A receptacle or an object instance: THOR id (unmangled), kind, location, host receptacle."""

    id: str
    kind: str
    loc: Loc
    centre: tuple[float, float, float]
    parent: str = ""


@dataclass(frozen=True)
class _Scene:
    num: int
    receptacles: tuple[_Thing, ...]
    points: tuple[tuple[int, int], ...]  # reachable grid points, in the layout file's order (ties pick the first)
    kinds: tuple[str, ...]  # placeable object kinds the scene lists, lamps included


@dataclass(frozen=True)
class _Task:
    task_type: str
    obj: str
    parent: str = ""
    toggle: str = ""


@dataclass(frozen=True)
class _Game:
    scene: _Scene
    task: _Task
    objects: tuple[_Thing, ...]
    start: Loc
    goal: str
    trial: str


@dataclass(frozen=True)
class _Job:
    out_dir: str
    seed: int
    split: str
    index: int
    task_type: str
    scenes: tuple[_Scene, ...]  # the split's scenes where task_type is feasible
    grammar: str
    max_steps: int


# --- the wheel's files --------------------------------------------------------------


def _wheel() -> tuple[ModuleType, ModuleType, Path]:
    """alfworld.gen's constants and goal library, and the wheel's package root."""
    engine.import_alfworld()
    import alfworld
    import alfworld.gen.constants as constants
    import alfworld.gen.goal_library as goal_library

    return constants, goal_library, Path(alfworld.__file__).parent


def layout_scenes() -> list[int]:
    """FloorPlan numbers with layout files in the wheel (120)."""
    root = _wheel()[2] / "gen" / "layouts"
    return sorted(int(p.name[len("FloorPlan"):-len("-objects.json")]) for p in root.glob("FloorPlan*-objects.json"))


def logic(grammar: str) -> tuple[str, str]:
    """(pddl_domain, grammar text with "UNKNOWN GOAL") for grammar "0.4" (the wheel's) or "0.3"."""
    if grammar not in GRAMMARS:
        raise ValueError(f"unknown ALFWorld grammar {grammar!r}: expected one of {GRAMMARS}")
    data = _wheel()[2] / "data"
    domain, twl2 = (data / "alfred.pddl").read_text(), (data / "alfred.twl2").read_text()
    if grammar == "0.3":
        # Undo scripts/patch_tw-pddl.py (alfworld 0.4's 0.3 -> 0.4 patch), in reverse order.
        help_at = domain.index("(:action help")
        domain = domain[:help_at] + domain[domain.index("\n)\n", help_at) + 3:].lstrip("\n")
        twl2 = twl2[:twl2.index("\naction help {")]
        twl2 = twl2.replace("You move the {o.name} to the {r.name}.", "You put the {o.name} in/on the {r.name}.")
        twl2 = twl2.replace("move {o} to {r}", "put {o} in/on {r}")
        twl2 = twl2.replace("You arrive at {r.name}.", "You arrive at {lend.name}.")
    return domain, twl2


# --- locations (ALFRED's get_obj_coords) -----------------------------------------


def pose_toward(centre: tuple[float, float, float], points: Sequence[tuple[int, int]], known: tuple[float, float] | None,
                kind: str, scene: int) -> Loc:
    """ALFRED's ``get_obj_coords``: the pose (grid x, z, rotation, horizon) looking at ``centre`` (m, THOR x y z).

    From ``known`` (a precomputed interaction point) or else the reachable point
    nearest to the centre; facing its dominant axis, stepping back when closer
    than 0.5 m, the horizon toward the object's height (rounded to 15 degrees).
    """
    import numpy as np

    constants = _wheel()[0]
    step, cam = constants.AGENT_STEP_SIZE, AGENT_HEIGHT + constants.CAMERA_HEIGHT_OFFSET
    pts = np.asarray(points, dtype=np.int32)
    c = np.array([centre[0], centre[2], centre[1]]) / step  # THOR boxes are x, z, y
    point_dists = c[:2][np.newaxis, :] - pts
    if known is not None:
        best_point, best_dist = np.array(known, dtype=float), c[:2] - np.array(known, dtype=float)
    else:
        best = int(np.argmin(np.sum(np.abs(point_dists), axis=1)))
        best_point, best_dist = pts[best].astype(float), point_dists[best]
    dist_to_obj = math.sqrt(float(np.sum(np.square(np.array([best_point[0], best_point[1], cam / step]) - c)))) * step
    if abs(best_dist[0]) > abs(best_dist[1]):
        rotation = 1 if best_dist[0] > 0 else 3
    else:
        rotation = 0 if best_dist[1] > 0 else 2
    if dist_to_obj < 0.5:  # pull back if too close, onto a reachable point only
        back = best_point.copy()
        back[{0: 1, 1: 0, 2: 1, 3: 0}[rotation]] += -1 if rotation in (0, 1) else 1
        mags = np.sum(np.abs((back[np.newaxis, :] - pts).astype(np.int32)), axis=1)
        if mags[int(np.argmin(mags))] == 0:
            best = int(np.argmin(mags))
            best_dist, best_point = point_dists[best], pts[best].astype(float)
    horizontal = float(np.max(np.abs(best_dist))) * step
    height = cam - centre[1]  # ALFRED uses the bottom of a degenerate box: the position's y
    angle = int(np.clip(np.round(np.arctan2(height, horizontal) * (180 / np.pi / constants.HORIZON_GRANULARITY))
                        * constants.HORIZON_GRANULARITY, -30, 60))
    forced = constants.FORCED_HORIZON_OBJS
    angle = forced.get((kind, scene), forced.get((kind, None), angle))
    return int(best_point[0]), int(best_point[1]), int(rotation), int(angle)


def thor_id(kind: str, centre: tuple[float, float, float], suffix: str = "") -> str:
    """A THOR object id ``Kind|+x.xx|+y.yy|+z.zz`` (zero unsigned, as THOR prints it)."""
    def num(v: float) -> str:
        text = f"{abs(v):05.2f}"
        return text if text == "00.00" else ("+" if v > 0 else "-") + text

    base = kind if not suffix else {"SinkBasin": "Sink", "BathtubBasin": "Bathtub"}[kind]
    return "|".join([base, *map(num, centre)] + ([suffix] if suffix else []))


def _id_centre(thor: str) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in thor.split("|")[1:4])
    return x, y, z


def _kind_of(thor: str) -> str:
    """Sinks and baths are ``Sink|x|y|z|SinkBasin``: their kind is the suffix."""
    parts = thor.split("|")
    return parts[-1] if parts[-1].endswith("Basin") else parts[0]


# --- scenes -----------------------------------------------------------------------


def load_scene(num: int) -> _Scene:
    """A scene's receptacles (openable.json's, plus guessed ones fixed per scene), reachable points, object kinds."""
    import numpy as np

    constants, _, root = _wheel()
    layouts = root / "gen" / "layouts"
    listed = json.loads((layouts / f"FloorPlan{num}-objects.json").read_text())
    poses = json.loads((layouts / f"FloorPlan{num}-openable.json").read_text())
    points = tuple((int(x), int(z)) for x, z in np.round(np.load(layouts / f"FloorPlan{num}-layout.npy") / constants.AGENT_STEP_SIZE).astype(np.int32))
    receptacles = []
    for thor in sorted(poses):
        known = (poses[thor][0] / constants.AGENT_STEP_SIZE, poses[thor][1] / constants.AGENT_STEP_SIZE)
        kind, centre = _kind_of(thor), _id_centre(thor)
        receptacles.append(_Thing(thor, kind, pose_toward(centre, points, known, kind, num), centre))
    static = sorted(set(listed) & (constants.RECEPTACLES - constants.MOVABLE_RECEPTACLES_SET) - {r.kind for r in receptacles})
    receptacles += _guess_receptacles(num, static, points, receptacles)
    placeable = set().union(*constants.VAL_RECEPTACLE_OBJECTS.values()) | set(LAMP_HOSTS)
    kinds = tuple(sorted(k for k in set(listed) & placeable if not k.endswith("Sliced")))
    return _Scene(num, tuple(sorted(receptacles, key=lambda r: r.id)), points, kinds)


def _guess_receptacles(num: int, kinds: Sequence[str], points: Sequence[tuple[int, int]], known: Sequence[_Thing]) -> list[_Thing]:
    """Receptacles the scene lists without a pose: each at a reachable point of its own, facing it from 0.5-1 m."""
    rng = random.Random(derive_seed("alfworld_gen.scene", GEN_VERSION, num))
    taken = {r.loc[:2] for r in known}
    out: list[_Thing] = []
    for kind in kinds:
        for _ in range(GUESSED_COUNT.get(kind, 1)):
            free = [p for p in points if p not in taken] or list(points)
            point, rotation, dist = rng.choice(free), rng.randrange(4), rng.uniform(0.5, 1.0)
            dx, dz = {0: (0.0, dist), 1: (dist, 0.0), 2: (0.0, -dist), 3: (-dist, 0.0)}[rotation]
            centre = (round(point[0] * 0.25 + dx, 2), GUESSED_HEIGHT.get(kind, 0.5), round(point[1] * 0.25 + dz, 2))
            suffix = kind if kind.endswith("Basin") else ""
            out.append(_Thing(thor_id(kind, centre, suffix), kind, pose_toward(centre, points, point, kind, num), centre))
            taken.add(point)
    return out


def _scene_kind(num: int) -> str:
    return {0: "Kitchen", 2: "LivingRoom", 3: "Bedroom", 4: "Bathroom"}[num // 100]


# --- tasks and objects --------------------------------------------------------------


def _hosts(scene: _Scene, kind: str, exclude: str = "") -> list[_Thing]:
    """Receptacles a ``kind`` object may start in (by the priors), not of kind ``exclude``."""
    constants = _wheel()[0]
    ok = (lambda r: r.kind in LAMP_HOSTS[kind]) if kind in LAMP_HOSTS else (lambda r: kind in constants.VAL_RECEPTACLE_OBJECTS.get(r.kind, ()))
    return [r for r in scene.receptacles if ok(r) and r.kind != exclude]


def feasible_tasks(scene: _Scene, task_type: str) -> list[_Task]:
    """Every (object, parent or lamp) this scene supports for ``task_type``, sorted."""
    constants = _wheel()[0]
    if _scene_kind(scene.num) not in constants.GOALS_VALID[task_type]:
        return []
    objects = [k for k in scene.kinds if k not in LAMP_HOSTS]
    if task_type == "look_at_obj_in_light":
        lamps = [lamp for lamp in scene.kinds if lamp in LAMP_HOSTS and _hosts(scene, lamp)]
        return [_Task(task_type, o, toggle=lamp) for lamp in lamps for o in objects if _hosts(scene, o)]
    kinds = {r.kind for r in scene.receptacles}
    prop, tool = _PLACE_ACTION.get(task_type, ("", ""))
    if tool and tool not in kinds:
        return []
    return [_Task(task_type, o, parent=p) for o in objects for p in sorted(kinds)
            if (not prop or o in constants.VAL_ACTION_OBJECTS[prop]) and p != tool
            and o in constants.VAL_RECEPTACLE_OBJECTS.get(p, ()) and _hosts(scene, o, exclude=p)]


def _place(scene: _Scene, task: _Task, rng: random.Random) -> tuple[_Thing, ...]:
    """1-3 instances of every kind the scene lists (2-3 targets for pick_two), each in a receptacle the priors allow."""
    placed: list[_Thing] = []
    used: set[str] = set()
    for kind in scene.kinds:
        target = kind == task.obj
        hosts = _hosts(scene, kind, exclude=task.parent if target else "")
        if not hosts:
            continue
        low = 2 if target and task.task_type == "pick_two_obj_and_place" else 1
        count = 1 if kind in LAMP_HOSTS else rng.randint(low, 3)
        for _ in range(count):
            host = rng.choice(hosts)
            centre, thor = host.centre, ""
            while not thor or thor in used:  # made-up coordinates near the host, unique ids
                centre = (round(host.centre[0] + rng.uniform(-0.3, 0.3), 2), round(host.centre[1] + rng.uniform(0.0, 0.1), 2),
                          round(host.centre[2] + rng.uniform(-0.3, 0.3), 2))
                thor = thor_id(kind, centre)
            used.add(thor)
            placed.append(_Thing(thor, kind, pose_toward(centre, scene.points, None, kind, scene.num), centre, host.id))
    return tuple(sorted(placed, key=lambda o: o.id))


def _sample_game(scene: _Scene, task_type: str, trial: str, rng: random.Random) -> _Game:
    goal_library = _wheel()[1]
    task = rng.choice(feasible_tasks(scene, task_type))
    objects = _place(scene, task, rng)
    at_receptacle = {r.loc for r in scene.receptacles}
    while True:  # a free start pose: "You are in the middle of a room"
        start = (*rng.choice(scene.points), rng.randrange(4), START_HORIZON)
        if start not in at_receptacle:
            break
    template = rng.choice(sorted(goal_library.gdict[task_type]["templates"]))
    goal = template.format(obj=task.obj.lower(), recep=task.parent.lower(), toggle=task.toggle.lower(), mrecep="")
    return _Game(scene, task, objects, start, goal, trial)


# --- files --------------------------------------------------------------------------


def _mangle(text: str) -> str:
    """ALFRED's fix_pddl_str_chars: THOR ids into PDDL names, '#' into PDDL's '-'."""
    return "".join(_MANGLE.get(ch, ch) for ch in text)


def _loc(loc: Loc) -> str:
    return "loc|%d|%d|%d|%d" % loc


def problem_pddl(game: _Game) -> str:
    """The problem, section by section as ALFWorld's augment_pddl_states.py writes it (sets sorted)."""
    constants, goal_library, _ = _wheel()
    receptacle_kinds = sorted(constants.RECEPTACLES - constants.MOVABLE_RECEPTACLES_SET)
    type_objects = sorted(constants.OBJECTS_SET - set(receptacle_kinds))
    rs, os_ = game.scene.receptacles, game.objects
    actions = constants.VAL_ACTION_OBJECTS
    in_scene = {o.kind for o in os_}
    locations = sorted(({r.loc for r in rs} | {o.loc for o in os_}) - {game.start})  # the start pose comes last
    fridges = {r.id for r in rs if r.kind == "Fridge"}
    header = "\n".join(["agent1 # agent", *(f"{k} # object" for k in type_objects), *(f"{k}Type # otype" for k in type_objects),
                        *(f"{k}Type # rtype" for k in receptacle_kinds)])
    entities = "\n".join([*(f"{o.id} # object" for o in os_), *(f"{r.id} # receptacle" for r in rs),
                          *(f"{_loc(loc)} # location" for loc in locations), f"{_loc(game.start)} # location"])
    can_contain = sorted({f"(canContain {r.kind}Type {k}Type)" for r in rs for k in constants.VAL_RECEPTACLE_OBJECTS.get(r.kind, ()) if k in in_scene})
    facts = [
        *(f"(receptacleType {r.id} {r.kind}Type)" for r in rs),
        *(f"(objectType {o.id} {o.kind}Type)" for o in os_),
        *can_contain,
        *(f"(pickupable {o.id})" for o in os_ if o.kind not in LAMP_HOSTS),
        *(f"(isReceptacleObject {o.id})" for o in os_ if o.kind in constants.MOVABLE_RECEPTACLES_SET),
        *(f"(openable {r.id})" for r in rs if r.kind in constants.OPENABLE_CLASS_SET),
        f"(atLocation agent1 {_loc(game.start)})",
        *(f"(cleanable {o.id})" for o in os_ if o.kind in actions["Cleanable"]),
        *(f"(heatable {o.id})" for o in os_ if o.kind in actions["Heatable"]),
        *(f"(coolable {o.id})" for o in os_ if o.kind in actions["Coolable"]),
        # ALFRED: target objects that were in a fridge start cool.
        *(f"(isCool {o.id})" for o in os_ if o.kind == game.task.obj and o.parent in fridges),
        *(f"(toggleable {o.id})" for o in os_ if o.kind in actions["Toggleable"]),
        *(f"(sliceable {o.id})" for o in os_ if o.kind in actions["Sliceable"]),
        *(f"(inReceptacle {o.id} {o.parent})" for o in os_),
        *(f"(receptacleAtLocation {r.id} {_loc(r.loc)})" for r in rs),
        *(f"(objectAtLocation {o.id} {_loc(o.loc)})" for o in os_),
    ]
    task = game.task
    goal = goal_library.gdict[task.task_type]["pddl"].format(obj=task.obj, recep=task.parent, toggle=task.toggle, mrecep="")
    indent = "\n        "
    text = (f"\n(define (problem plan_{game.trial})\n    (:domain alfred)\n    (:objects{indent}{header.replace(chr(10), indent)}"
            f"{indent}{entities.replace(chr(10), indent)}\n        )\n\n    (:init{indent}{indent.join(facts)}\n        )\n{goal}")
    return _mangle(text)


def _folder(game: _Game) -> str:
    task = game.task
    return f"{task.task_type}-{task.obj}-None-{task.parent or task.toggle}-{game.scene.num}"


def _dumps(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True) + "\n"


def _traj_data(game: _Game, job: _Job, attempt: int) -> dict[str, object]:
    from alfworld.info import __version__ as alfworld_version

    task = game.task
    return {
        "generated": True,
        "generator": {"name": __name__, "version": GEN_VERSION, "alfworld": alfworld_version, "seed": job.seed,
                      "split": job.split, "index": job.index, "attempt": attempt, "grammar": job.grammar, "task_desc": game.goal},
        "task_id": game.trial,
        "task_type": task.task_type,
        "pddl_params": {"object_target": task.obj, "parent_target": task.parent, "toggle_target": task.toggle,
                        "mrecep_target": "", "object_sliced": False},
        "scene": {"floor_plan": f"FloorPlan{game.scene.num}", "scene_num": game.scene.num},
    }


def _write(folder: Path, game: _Game, job: _Job, attempt: int, walkthrough: list[str] | None) -> None:
    domain, twl2 = logic(job.grammar)
    gamedata = {"pddl_domain": domain, "grammar": twl2.replace("UNKNOWN GOAL", game.goal), "pddl_problem": problem_pddl(game),
                "solvable": walkthrough is not None, "walkthrough": walkthrough}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "traj_data.json").write_text(_dumps(_traj_data(game, job, attempt)))
    (folder / "game.tw-pddl").write_text(_dumps(gamedata))


# --- generation -----------------------------------------------------------------------


def _make_game(job: _Job) -> GeneratedGame:
    """Game ``job.index`` of its split: candidates until the handcoded expert wins one, which is written."""
    trial = f"trial_G{job.seed}_{job.index:06d}"
    for attempt in range(MAX_ATTEMPTS):
        # The grammar is left out on purpose: "0.3" and "0.4" give the same games, worded differently.
        rng = random.Random(derive_seed("alfworld_gen", GEN_VERSION, job.seed, job.split, job.index, attempt))
        game = _sample_game(rng.choice(job.scenes), job.task_type, trial, rng)
        with tempfile.TemporaryDirectory(prefix="ipr-alfworld-gen-") as tmp:
            # Solved outside out_dir: a loader walking out_dir never sees a candidate.
            _write(Path(tmp), game, job, attempt, None)
            walkthrough = engine.expert_walkthrough(Path(tmp) / "game.tw-pddl", "handcoded", seed=rng.getrandbits(32),
                                                    max_steps=job.max_steps)
        if walkthrough is None:
            continue
        rel = Path(job.split) / _folder(game) / trial
        final = Path(job.out_dir) / rel
        if final.exists():
            shutil.rmtree(final)
        _write(final, game, job, attempt, walkthrough)
        return GeneratedGame((rel / "game.tw-pddl").as_posix(), job.split, job.task_type, game.scene.num, len(walkthrough), game.goal)
    raise RuntimeError(f"no game the expert solves after {MAX_ATTEMPTS} candidates: {job.split} #{job.index} ({job.task_type})")


def _split_counts(n: int | Mapping[str, int]) -> dict[str, int]:
    counts = {s: n for s in SPLITS} if isinstance(n, int) else {s: int(n.get(s, 0)) for s in SPLITS}
    unknown = set() if isinstance(n, int) else set(n) - set(SPLITS)
    if unknown or any(v < 0 for v in counts.values()):
        raise ValueError(f"n: a count >= 0, or counts per split among {SPLITS}; got {n!r}")
    return counts


def _pools(scenes: Sequence[int] | None, unseen_scenes: Sequence[int]) -> dict[str, tuple[int, ...]]:
    available = set(layout_scenes())
    unseen = tuple(sorted(set(unseen_scenes)))
    seen = tuple(sorted((set(scenes) if scenes is not None else available) - set(unseen)))
    if scenes is not None and set(scenes) & set(unseen):
        raise ValueError(f"scenes {sorted(set(scenes) & set(unseen))} are held out for valid_unseen (unseen_scenes)")
    if missing := sorted((set(seen) | set(unseen)) - available):
        raise ValueError(f"no layout in the alfworld wheel for FloorPlan {missing}")
    return {"train": seen, "valid_seen": seen, "valid_unseen": unseen}


def _jobs(out_dir: str, seed: int, counts: Mapping[str, int], types: Sequence[str], pools: Mapping[str, tuple[int, ...]],
          grammar: str, max_steps: int) -> Iterator[_Job]:
    loaded = {num: load_scene(num) for num in sorted(set().union(*pools.values()))}
    for split in SPLITS:
        if not counts[split]:
            continue
        feasible = {t: tuple(loaded[s] for s in pools[split] if feasible_tasks(loaded[s], t)) for t in types}
        split_types = [t for t in types if feasible[t]]
        if not split_types:
            raise ValueError(f"no scene of {split} ({list(pools[split])}) supports any of {list(types)}")
        for k in range(counts[split]):
            task_type = split_types[k % len(split_types)]
            yield _Job(out_dir, seed, split, k, task_type, feasible[task_type], grammar, max_steps)


def generate_games(out_dir: str | os.PathLike[str], seed: int, n: int | Mapping[str, int],
                   task_types: Sequence[str] | None = None, scenes: Sequence[int] | None = None, grammar: str = "0.4",
                   unseen_scenes: Sequence[int] = UNSEEN_SCENES, max_steps: int = engine.EXPERT_MAX_STEPS, workers: int = 1,
                   progress: bool = True) -> list[GeneratedGame]:
    """Write solvable games under ``out_dir/<split>/...``; returns them in (split, index) order.

    ``n``: games per split (an int for each of train, valid_seen, valid_unseen,
    or a mapping such as ``{"train": 100, "valid_unseen": 20}``). ``scenes``:
    the FloorPlans train and valid_seen draw from (default: all but
    ``unseen_scenes``). A task type no scene of a split supports is skipped in
    that split. ``max_steps``: the longest expert walkthrough kept (the
    official cap is the expert's 200; the handcoded expert searches receptacle
    by receptacle, so a 27-drawer kitchen can take 100 steps: an agent limited
    to 50 steps may want 50). ``workers`` > 1 solves games in that many spawned processes
    (same files; a calling script needs the ``if __name__ == "__main__"``
    guard). Existing trial folders of the same name are replaced; nothing else
    in out_dir is touched (clear it first to drop games of another seed).
    """
    types = tuple(task_types) if task_types is not None else TASK_TYPES
    if bad := [t for t in types if t not in TASK_TYPES]:
        raise ValueError(f"unknown ALFWorld task types {bad}: expected among {TASK_TYPES}")
    logic(grammar)  # validates the grammar name before any work
    jobs = list(_jobs(str(out_dir), seed, _split_counts(n), types, _pools(scenes, unseen_scenes), grammar, max_steps))
    bar = tqdm(total=len(jobs), desc="ALFWorld games", unit="game", disable=not progress)
    try:
        if workers <= 1:
            return [_tick(bar, _make_game(job)) for job in jobs]
        # spawn: a forked child would inherit the parent's threads and fast_downward state.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return [_tick(bar, game) for game in pool.map(_make_game, jobs)]
    finally:
        bar.close()


def _tick(bar: tqdm, game: GeneratedGame) -> GeneratedGame:
    bar.update(1)
    bar.set_postfix_str(f"{game.split} {game.task_type}", refresh=False)
    return game


__all__ = ["GEN_VERSION", "GRAMMARS", "SPLITS", "TASK_TYPES", "UNSEEN_SCENES", "GeneratedGame", "feasible_tasks",
           "generate_games", "layout_scenes", "load_scene", "logic", "pose_toward", "problem_pddl", "thor_id"]
