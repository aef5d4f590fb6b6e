"""ALFWorld (text) on its own engine: official games when the user has them, generated games otherwise.

A game is a folder in the official ``alfworld-download`` layout,
``json_2.1.1/<split>/<task folder>/<trial>/`` holding ``game.tw-pddl`` and
``traj_data.json``: the user's ``$ALFWORLD_DATA`` (2,851 train / 140
valid_seen / 134 valid_unseen in the papers) or games written by
``ipr data alfworld-games`` from what the alfworld wheel ships
(``alfworld_gen.py``). Games carrying the generator's marker are labelled
``generated`` in every task's meta, and reports say so: they are the ALFWorld
engine on generated tasks, not the benchmark's instances.

Splits: ``train`` (the train folder minus a hashed 1-in-20 slice), ``dev``
(that slice: the validation split, since ALFWorld has none of its own),
``valid_seen`` and ``valid_unseen`` (the papers' seen / unseen test sets).
The default step limit is the papers' 20.

Episodes run on textworld's ``PddlEnv`` with ALFWorld's wrappers
(``alfworld_engine.py``). Restoring a prefix is reset + replay (the engine has
no state snapshot), so what makes it fast is not loading again: loaded games
are kept, per process, on a shelf shared by every instance (``GameShelf``), and
a reset restores the state built at load instead of translating the PDDL
again (``alfworld_engine``).

Commands: both surface forms are accepted, alfworld 0.4's ``move X to Y`` and
the 0.3 text the papers used, ``put X in/on Y``; a command in the other form
than the game's grammar is translated to the game's admissible one. A command
that is not admissible gets ALFWorld's own "Nothing happens." and counts as a
step. Reward: the binary success of the papers (1 once the goal holds).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, model_validator

from ipr_core.conversation import OBS_PREFIX, with_example
from ipr_core.envs.base import ConfiguredEnv, StepResult, Thought, check_split, command_thought, first_n, require_episode, two_part
from ipr_core.envs.registry import EnvOptions, comma_separated, one_of, subset_of
from ipr_core.resources import process_wide
from ipr_core.seeding import derive_seed
from ipr_core.types import Task

TASK_TYPES = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)
SPLITS = ("train", "dev", "valid_seen", "valid_unseen")
_FOLDER = {"train": "train", "dev": "train", "valid_seen": "valid_seen", "valid_unseen": "valid_unseen"}
_DEV_BUCKETS = 20  # 1 train game in 20 (by a hash of its path) is dev
_LAYOUT = "json_2.1.1"
_NOTHING = "Nothing happens."
_WELCOME = "-= Welcome to TextWorld, ALFRED! =-"
DEFAULT_MAX_STEPS = 20  # the papers' limit (ETO, IPR)


def _data_root(data: str | None) -> Path:
    """The folder holding the split folders: ``data`` (or $ALFWORLD_DATA) itself or its json_2.1.1."""
    root = Path(os.path.expandvars(os.path.expanduser(data or os.environ.get("ALFWORLD_DATA", ""))))
    return root / _LAYOUT if (root / _LAYOUT).is_dir() else root


class ALFWorldOptions(EnvOptions):
    """Options of ``alfworld``."""

    data: str | None = Field(
        None,
        description="Folder of ALFWorld games in the official layout (json_2.1.1/{train,valid_seen,valid_unseen}/...): "
        "the official download or `ipr data alfworld-games --out DIR`; None: $ALFWORLD_DATA.",
    )
    task_types: Annotated[tuple[str, ...] | None, BeforeValidator(comma_separated), subset_of("ALFWorld task types", TASK_TYPES)] = Field(
        None, description=f"Keep only these task types, from {list(TASK_TYPES)}; None: all six."
    )
    expert: Annotated[str, one_of("ALFWorld expert", ("handcoded", "planner"))] = Field(
        "handcoded", description="ALFWorld's handcoded expert (its move/put bug fixed, seeded per task) or the PDDL planner's optimal plan."
    )
    shelf_games: int = Field(16, ge=1, description="Loaded games kept per process for reuse across episodes (each a few MB; loading one costs about a second).")
    in_context_example: bool = Field(
        False,
        description="Show a solved train game of the same task type before each task (the papers' one-shot prompt for pretrained models). "
        "Generation sees it; SFT data and pairs are built without it.",
    )

    @model_validator(mode="after")
    def _has_games(self) -> "ALFWorldOptions":
        if not self.data and not os.environ.get("ALFWORLD_DATA"):
            raise ValueError("option 'data' is not set and neither is $ALFWORLD_DATA: point it at ALFWorld games, or generate some with `ipr data alfworld-games --out DIR`")
        root = _data_root(self.data)
        if not any((root / f).is_dir() for f in set(_FOLDER.values())):
            raise ValueError(
                f"option 'data': no ALFWorld split folders (train, valid_seen, valid_unseen) under {root}; "
                "expected the official layout json_2.1.1/<split>/<task>/<trial>/game.tw-pddl (`ipr data alfworld-games --out DIR` writes one)"
            )
        return self


@dataclass(frozen=True)
class GameEntry:
    """One game on disk: its path relative to the data root and what its traj_data says."""

    rel: str  # <split folder>/<task folder>/<trial>
    task_type: str
    generated: bool
    walkthrough_steps: int | None


def scan_games(root: Path, folder: str) -> list[GameEntry]:
    """The games of one split folder that ALFWorld's own loader would keep, sorted by path:
    a traj_data.json with a solvable game.tw-pddl beside it, not a movable/Sliced trial."""
    entries = []
    for traj in sorted((root / folder).glob("*/*/traj_data.json")):
        game = traj.parent / "game.tw-pddl"
        rel = traj.parent.relative_to(root).as_posix()
        if "movable" in rel or "Sliced" in rel or not game.is_file():
            continue
        data = json.loads(game.read_text())
        if not data.get("solvable"):
            continue
        meta = json.loads(traj.read_text())
        walk = data.get("walkthrough")
        entries.append(GameEntry(rel, str(meta.get("task_type", "")), bool(meta.get("generated", False)), len(walk) if walk else None))
    return entries


def _in_dev(rel: str) -> bool:
    return int(hashlib.blake2b(rel.encode(), digest_size=4).hexdigest(), 16) % _DEV_BUCKETS == 0


# --- the shelf of loaded games ---------------------------------------------------------


class GameShelf:
    """Loaded games, shared by every adapter instance of a process.

    Loading a game parses its grammar and translates its PDDL (about a second);
    an MC rollout restores its prefix by reset + replay on the same game many
    times. ``lend(path)`` gives a loaded engine for ``path`` that no one else
    holds (a kept one when there is, else a new one); ``give_back`` keeps it,
    dropping the least recently returned engines beyond ``capacity``.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._idle: OrderedDict[int, tuple[str, Any]] = OrderedDict()  # ticket -> (path, engine)
        self._ticket = 0
        self._lock = threading.Lock()
        self.loads = 0  # engines built (for benches and tests)

    def lend(self, path: str) -> Any:
        with self._lock:
            for ticket, (p, engine) in self._idle.items():
                if p == path:
                    del self._idle[ticket]
                    return engine
            self.loads += 1
        from ipr_core.envs.alfworld_engine import open_game

        return open_game(path, expert=None)

    def give_back(self, path: str, engine: Any) -> None:
        with self._lock:
            self._ticket += 1
            self._idle[self._ticket] = (path, engine)
            while len(self._idle) > self.capacity:
                self._idle.popitem(last=False)


def game_shelf(capacity: int) -> GameShelf:
    """The process's shelf of ``capacity`` loaded games."""
    return process_wide(("alfworld-shelf", capacity), lambda: GameShelf(capacity))


# --- the adapter -----------------------------------------------------------------------


class ALFWorldEnv(ConfiguredEnv, name="alfworld", options=ALFWorldOptions):
    """ALFWorld games of one data folder behind the ``Environment`` protocol."""

    def _configure(self, o: ALFWorldOptions) -> None:
        self.root = _data_root(o.data)
        self.task_types = o.task_types or TASK_TYPES
        self.expert_type = o.expert
        self.max_steps = int(o.max_steps or DEFAULT_MAX_STEPS)
        self.in_context_example = o.in_context_example
        self._shelf = game_shelf(o.shelf_games)
        self._engine: Any = None
        self._engine_path = ""
        self._admissible: list[str] = []

    # --- tasks --------------------------------------------------------------------

    def games(self, split: str) -> list[GameEntry]:
        """The games of ``split`` of the selected task types, sorted by path."""
        check_split(self.name, split, SPLITS)
        folder = _FOLDER[split]
        keep = [g for g in self._scan(folder) if g.task_type in self.task_types]
        if folder == "train":
            keep = [g for g in keep if _in_dev(g.rel) == (split == "dev")]
        return keep

    def _scan(self, folder: str) -> list[GameEntry]:
        # Once per process and folder: every episode's instance needs the train listing for its example.
        return process_wide(("alfworld-scan", str(self.root), folder), lambda: scan_games(self.root, folder))

    def list_tasks(self, split: str, n: int | None = None, seed: int = 0) -> list[Task]:
        """``n`` games of ``split`` in a seeded order (prefix-stable: a smaller ``n`` is a prefix)."""
        games = self.games(split)
        random.Random(derive_seed("alfworld", split, seed)).shuffle(games)
        games = first_n(games, n, f"ALFWorld {split} games of {list(self.task_types)} under {self.root}")
        # The seed drives only the handcoded expert's random choices.
        return [
            Task(g.rel, self.name, split, derive_seed("alfworld", g.rel) & 0x7FFFFFFF, {"game": g.rel, "task_type": g.task_type, "generated": g.generated})
            for g in games
        ]

    # --- episode ------------------------------------------------------------------

    def system_prompt(self) -> str:
        return (
            "You are an agent in a household. Complete the task you are given by interacting with the rooms, "
            "one command per turn. Commands:\n"
            "go to <receptacle>, open <receptacle>, close <receptacle>, take <object> from <receptacle>, "
            "put <object> in/on <receptacle>, clean <object> with <receptacle>, heat <object> with <receptacle>, "
            "cool <object> with <receptacle>, use <object>, examine <something>, inventory, look.\n"
            "Objects and receptacles are named with their number, e.g. mug 1, countertop 2. "
            'If the answer is "Nothing happens.", the command was not possible: try another.\n'
            "Reply in this format:\nThought: <one short sentence>\nAction: <one command>"
        )

    def _game_path(self, task: Task) -> str:
        rel = str(task.meta.get("game", task.task_id))
        path = self.root / rel / "game.tw-pddl"
        if not path.is_file():
            raise ValueError(f"ALFWorld task {task.task_id}: no game at {path}")
        return str(path)

    def reset(self, task: Task) -> str:
        path = self._game_path(task)
        if self._engine is not None and self._engine_path != path:
            self._shelf.give_back(self._engine_path, self._engine)
            self._engine = None
        if self._engine is None:
            self._engine, self._engine_path = self._shelf.lend(path), path
        state = self._engine.reset()
        self._admissible = list(state["admissible_commands"])
        self._t, self._done = 0, False
        intro = _intro(str(state["feedback"]))
        return with_example(self.example(task), intro) if self.in_context_example else intro

    def example(self, task: Task) -> str:
        """The in-context example for ``task``: the first train game (by path) of its task type other than
        its own, played by the expert, as text. Computed once per process and data folder."""
        ty = str(task.meta.get("task_type", ""))
        games = [g for g in self._scan("train") if g.task_type == ty and g.rel != task.meta.get("game")]
        if not games:
            raise ValueError(f"ALFWorld in_context_example: no other train game of type {ty!r} under {self.root}")
        return process_wide(("alfworld-example", str(self.root), games[0].rel, self.expert_type), lambda: self._play_example(games[0]))

    def _play_example(self, game: GameEntry) -> str:
        """A game played by the expert in a fresh engine (this instance's episode is left alone), as
        ``Thought/Action/Observation`` text."""
        from ipr_core.envs.alfworld_engine import open_game

        task = Task(game.rel, self.name, "train", derive_seed("alfworld", game.rel) & 0x7FFFFFFF, {"game": game.rel, "task_type": game.task_type})
        plan = self.expert(task)
        if not plan:
            raise ValueError(f"ALFWorld in_context_example: the expert does not win {game.rel}")
        engine = open_game(self._game_path(task), expert=None)
        lines = [_intro(str(engine.reset()["feedback"]))]
        for thought, action in plan:
            state, _, _ = engine.step(action)
            lines += [f"Thought: {thought}\nAction: {action}", OBS_PREFIX + " ".join(str(state["feedback"]).split())]
        return "\n".join(lines)

    def _command(self, action: str) -> str:
        """The game's admissible command for ``action`` in either surface form, else ``action``."""
        from ipr_core.envs.alfworld_engine import as_03, as_04

        text = " ".join(action.strip().split()).rstrip(".")
        if text in self._admissible:
            return text
        for other in (as_04(text), as_03(text)):
            if other in self._admissible:
                return other
        return text

    def step(self, action: str) -> StepResult:
        require_episode(self._done)
        command = self._command(action)
        invalid = command not in self._admissible
        state, _, _ = self._engine.step(command)
        self._admissible = list(state["admissible_commands"])
        self._t += 1
        won = bool(state["won"])
        truncated = not won and self._t >= self.max_steps
        self._done = won or truncated
        obs = _NOTHING if invalid else " ".join(str(state["feedback"]).split())
        info = {"success": won, "invalid": invalid, "truncated": truncated, "steps": self._t, "action": command}
        return StepResult(obs, 1.0 if won else 0.0, self._done, info)

    # --- expert -------------------------------------------------------------------

    def expert(self, task: Task) -> list[tuple[str, str]] | None:
        """The configured ALFWorld expert's commands for ``task`` (None when it cannot win), with templated thoughts."""
        from ipr_core.envs.alfworld_engine import expert_walkthrough

        plan = expert_walkthrough(self._game_path(task), expert=self.expert_type, seed=task.seed)
        if plan and plan[0] == "look" and self.expert_type == "handcoded":
            # The handcoded expert says "look" before it has observed anything; the
            # command changes no state, so it only costs the agent a step.
            plan = plan[1:]
        return None if plan is None else [(alfworld_thought(a), a) for a in plan]

    def close(self) -> None:
        if self._engine is not None:
            self._shelf.give_back(self._engine_path, self._engine)
            self._engine = None
        self._done = True


def _intro(feedback: str) -> str:
    """The first observation without TextWorld's banner: the room, then the task sentence."""
    text = feedback.replace(_WELCOME, "").strip()
    return "\n\n".join(" ".join(p.split()) for p in text.split("\n\n") if p.strip())


# --- expert thoughts -------------------------------------------------------------------


def _go(action: str, verb: str, rest: str) -> str | None:
    return f"I go to the {rest.removeprefix('to ')} to see what is there." if rest.startswith("to ") else None


_BY_VERB: dict[str, Thought] = {
    "go": _go,
    "take": two_part(" from ", "The {a} is here; I take it from the {b}."),
    "put": two_part(" in/on ", "I have what I need, so I put the {a} in/on the {b}."),
    "move": two_part(" to ", "I have what I need, so I put the {a} in/on the {b}."),
    "open": "The {rest} is closed; I open it to look inside.",
    "close": "Nothing I need is in the {rest}; I close it.",
    "clean": two_part(" with ", "The {a} must be clean, so I clean it with the {b}."),
    "heat": two_part(" with ", "The {a} must be hot, so I heat it with the {b}."),
    "cool": two_part(" with ", "The {a} must be cool, so I cool it with the {b}."),
    "use": "I turn on the {rest} to look at the object under its light.",
    "toggle": "I turn on the {rest}.",
    "examine": "I examine the {rest}.",
}


def alfworld_thought(action: str) -> str:
    """A short deterministic thought for an expert command (as the other adapters' experts)."""
    return command_thought(action, {"look": "I look around to see where I am.", "inventory": "I check what I am carrying."}, _BY_VERB)
