"""TextWorld-Express: fast text games (twc, cookingworld, coin, mapreader, ...).

Runs the package's bundled jar in our own JVM (``pool.JavaServer``, capped
heap) and talks to its ``PythonInterface`` directly: one JSON round trip per
step. A task is (game, game_params, fold, seed) from TextWorld-Express's own
train/dev/test seed lists, so splits are disjoint by construction and a task
replays exactly (measured: identical observations on every rerun).

Reward: the game's normalised score clipped to [0, 1] (it goes negative after
harmful actions). Success: the game's ``tasksuccess``. Invalid actions: the
game answers "Unknown action: ..." itself (its ``validActions`` list is not
complete, so it cannot decide validity).
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from ipr_core.envs.base import EnvError, StepResult
from ipr_core.envs.pool import JavaServer, JVMBackedEnv, JVMOptions
from ipr_core.seeding import derive_seed
from ipr_core.types import Task

GAMES = ("cookingworld", "twc", "coin", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder")
SPLITS = ("train", "dev", "test")
# Default step limits with default params: the longest gold path over 150 seeds
# (cookingworld 128, coin 34, twc 28, mapreader 13, the others <= 10) plus headroom.
DEFAULT_MAX_STEPS = {"cookingworld": 150, "coin": 50, "twc": 50, "mapreader": 25, "arithmetic": 15, "sorting": 20, "simonsays": 15, "peckingorder": 20}
_UNKNOWN = "Unknown action"


class TextWorldExpressEnv(JVMBackedEnv):
    """One TextWorld-Express game family (``game`` with ``game_params``) per instance."""

    _sim_name = "TextWorld-Express"

    name = "textworld_express"

    def __init__(self, game: str = "twc", game_params: str = "", max_steps: int | None = None, heap: str = "256m"):
        if game not in GAMES:
            raise ValueError(f"unknown TextWorld-Express game {game!r}; choose from {list(GAMES)}")
        self.game = game
        self.game_params = game_params
        self.max_steps = int(max_steps or DEFAULT_MAX_STEPS[game])
        self._jvm_options = JVMOptions(heap=heap)
        self._server: JavaServer | None = None
        self._api: Any = None
        self._task: Task | None = None
        self._t = 0
        self._done = True

    # --- the JVM ------------------------------------------------------------------

    def _ensure_server(self) -> Any:
        """The simulator, (re)started if it is not running: reset() heals a crashed instance."""
        if self._server is not None and not self._server.alive():
            self._server.close()
            self._server = None
        if self._server is None:
            from textworld_express.constants import BASEPATH, JAR_PATH

            server = JavaServer(JAR_PATH, BASEPATH, self._jvm_options)
            try:
                api = server.call(lambda: server.jvm.textworldexpress.runtime.PythonInterface())
                msg = server.call(api.load, self.game, self.game_params)
            except BaseException:
                server.close()
                raise
            if msg:
                server.close()
                raise ValueError(f"TextWorld-Express rejected game {self.game!r} with params {self.game_params!r}: {msg}")
            self._server, self._api = server, api
        return self._api


    # --- tasks --------------------------------------------------------------------

    def _params_tag(self) -> str:
        return hashlib.blake2b(self.game_params.encode(), digest_size=3).hexdigest() if self.game_params else "default"

    def list_tasks(self, split: str, n: int | None = None, seed: int = 0) -> list[Task]:
        """``n`` seeds of the game's own ``split`` seed list, in a seeded order (prefix-stable)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} for textworld_express; choose from {list(SPLITS)}")
        getter = {"train": "getSeedsTrain", "dev": "getSeedsDev", "test": "getSeedsTest"}[split]
        self._ensure_server()
        seeds = sorted(int(s) for s in self._call(getter))
        random.Random(derive_seed("twx", self.game, self.game_params, split, seed)).shuffle(seeds)
        if n is not None:
            if n > len(seeds):
                raise ValueError(f"{self.game} has {len(seeds)} {split} seeds, {n} requested")
            seeds = seeds[:n]
        tag = self._params_tag()
        meta = {"game": self.game, "game_params": self.game_params}
        return [Task(f"{self.game}-{tag}-{split}-{s}", self.name, split, s, meta) for s in seeds]

    # --- episode ------------------------------------------------------------------

    def system_prompt(self) -> str:
        return (
            "You are playing a text game. Each turn you read an observation and type one command "
            "(e.g. look around, inventory, take <item>, put <item> in <container>, open <container>, "
            "move <direction>, read <item>). Complete the task in as few steps as possible.\n"
            "Reply in this format:\nThought: <one short sentence>\nAction: <one command>"
        )

    def _check_task(self, task: Task) -> None:
        game = task.meta.get("game", self.game)
        params = task.meta.get("game_params", self.game_params)
        if (game, params) != (self.game, self.game_params):
            raise ValueError(f"task {task.task_id} is for {game!r} with params {params!r}; this environment runs {self.game!r} with {self.game_params!r}")

    def _new_game(self, task: Task, gold: bool) -> dict:
        self._check_task(task)
        self._ensure_server()
        return json.loads(self._call("generateNewGameJSON", int(task.seed), task.split, gold))

    def reset(self, task: Task) -> str:
        first = self._new_game(task, gold=False)
        self._task, self._t, self._done = task, 0, False
        desc = str(self._call("getTaskDescription")).strip()
        return f"{desc}\n{first['observation'].strip()}"

    def step(self, action: str) -> StepResult:
        if self._done:
            raise RuntimeError("step() called on a finished episode: call reset(task) first")
        command = " ".join(action.split())  # one line: the simulator parses a single command
        r = json.loads(self._call("stepJSON", command))
        self._t += 1
        obs = r["observation"].strip()
        score = float(r["score"])
        success = bool(r["tasksuccess"])
        ended = success or bool(r["taskfailure"]) or score >= 1.0
        truncated = not ended and self._t >= self.max_steps
        self._done = ended or truncated
        info = {"success": success, "invalid": obs.startswith(_UNKNOWN), "truncated": truncated, "score": score, "steps": self._t}
        return StepResult(obs, min(max(score, 0.0), 1.0), self._done, info)

    def expert(self, task: Task) -> list[tuple[str, str]] | None:
        """The game's gold action sequence with templated thoughts."""
        self._new_game(task, gold=True)
        gold = [str(a) for a in self._call("getGoldActionSequence")]
        self._done = True  # the gold game is not an episode: reset() before stepping
        if not gold or gold[0].startswith("ERROR"):
            return None
        return [(text_game_thought(a), a) for a in gold]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._done = True


_CUT = {"slice": "sliced", "chop": "chopped", "dice": "diced"}


def text_game_thought(action: str) -> str:
    """A short deterministic thought for a text-game command, keyed on its verb."""
    words = action.split()
    verb, rest = (words[0].lower(), " ".join(words[1:])) if words else ("", "")
    if action == "look around":
        return "I look around to see where I am and what is here."
    if action in ("inventory", "task"):
        return f"I check my {action} before going on."
    if verb == "take":
        return f"I need the {rest}, so I take it."
    if verb == "put" and " in " in rest:
        item, place = rest.split(" in ", 1)
        return f"The {item} belongs in the {place}, so I put it there."
    if verb == "open":
        return f"The {rest} is closed, so I open it."
    if verb == "close":
        return f"I am done with the {rest}, so I close it."
    if verb == "move":
        return f"What I need is elsewhere, so I move {rest}."
    if verb == "read":
        return f"The {rest} may tell me what to do, so I read it."
    if verb in _CUT:
        return f"The recipe needs the {rest} {_CUT[verb]}, so I {verb} it."
    if verb == "cook":
        return f"The recipe says to cook it this way, so I {action}."
    if verb in ("prepare", "eat"):
        return f"Everything is ready, so I {action}."
    return f"Next, I {action}."
