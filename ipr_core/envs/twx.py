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
from typing import Annotated, Any

from pydantic import Field

from ipr_core.envs.base import StepResult, Thought, check_split, command_thought, first_n, require_episode, two_part
from ipr_core.envs.pool import JavaServer, JVMBackedEnv, JVMHeap, Simulator
from ipr_core.envs.registry import EnvOptions, one_of
from ipr_core.seeding import derive_seed
from ipr_core.types import Task

GAMES = ("cookingworld", "twc", "coin", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder")
SPLITS = ("train", "dev", "test")
# Default step limits with default params: the longest gold path over 150 seeds
# (cookingworld 128, coin 34, twc 28, mapreader 13, the others <= 10) plus headroom.
DEFAULT_MAX_STEPS = {"cookingworld": 150, "coin": 50, "twc": 50, "mapreader": 25, "arithmetic": 15, "sorting": 20, "simonsays": 15, "peckingorder": 20}
_UNKNOWN = "Unknown action"


class TextWorldExpressOptions(EnvOptions):
    """Options of ``textworld_express``: one game family per instance."""

    game: Annotated[str, one_of("TextWorld-Express game", GAMES)] = Field("twc", description=f"One of {', '.join(GAMES)}.")
    game_params: str = Field("", description="The game's own parameters, e.g. 'numLocations=1,includeDoors=0' ('' = the game's defaults).")
    heap: JVMHeap = Field("256m", description="-Xmx of the simulator's JVM.")


_SIMULATOR = Simulator("TextWorld-Express", "textworld_express", "textworldexpress.runtime.PythonInterface")


class TextWorldExpressEnv(JVMBackedEnv, name="textworld_express", options=TextWorldExpressOptions, simulator=_SIMULATOR):
    """One TextWorld-Express game family (``game`` with ``game_params``) per instance."""

    def _configure(self, o: TextWorldExpressOptions) -> None:
        self.game, self.game_params = o.game, o.game_params
        self.max_steps = int(o.max_steps or DEFAULT_MAX_STEPS[o.game])
        self._task: Task | None = None

    # --- the JVM ------------------------------------------------------------------

    def _open_api(self, server: JavaServer) -> Any:
        api = super()._open_api(server)
        msg = server.call(api.load, self.game, self.game_params)
        if msg:
            raise ValueError(f"TextWorld-Express rejected game {self.game!r} with params {self.game_params!r}: {msg}")
        return api

    # --- tasks --------------------------------------------------------------------

    def _params_tag(self) -> str:
        return hashlib.blake2b(self.game_params.encode(), digest_size=3).hexdigest() if self.game_params else "default"

    def list_tasks(self, split: str, n: int | None = None, seed: int = 0) -> list[Task]:
        """``n`` seeds of the game's own ``split`` seed list, in a seeded order (prefix-stable)."""
        check_split(self.name, split, SPLITS)
        getter = {"train": "getSeedsTrain", "dev": "getSeedsDev", "test": "getSeedsTest"}[split]
        self._ensure_server()
        seeds = sorted(int(s) for s in self._call(getter))
        random.Random(derive_seed("twx", self.game, self.game_params, split, seed)).shuffle(seeds)
        seeds = first_n(seeds, n, f"{split} seeds of {self.game}")
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
        require_episode(self._done)
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
        gold = self._gold_actions()  # the gold game is not an episode: reset() before stepping
        return [(text_game_thought(a), a) for a in gold] if gold is not None else None


_CUT = {"slice": "sliced", "chop": "chopped", "dice": "diced"}


_WHOLE_COMMANDS: dict[str, Thought] = {
    "look around": "I look around to see where I am and what is here.",
    "inventory": "I check my {action} before going on.", "task": "I check my {action} before going on.",
}  # fmt: skip
_VERBS: dict[str, Thought] = {
    "take": "I need the {rest}, so I take it.", "put": two_part(" in ", "The {a} belongs in the {b}, so I put it there."),
    "open": "The {rest} is closed, so I open it.", "close": "I am done with the {rest}, so I close it.",
    "move": "What I need is elsewhere, so I move {rest}.", "read": "The {rest} may tell me what to do, so I read it.",
    **{verb: f"The recipe needs the {{rest}} {done}, so I {verb} it." for verb, done in _CUT.items()},
    "cook": "The recipe says to cook it this way, so I {action}.",
    "prepare": "Everything is ready, so I {action}.", "eat": "Everything is ready, so I {action}.",
}  # fmt: skip


def text_game_thought(action: str) -> str:
    """A short deterministic thought for a text-game command, keyed on its verb."""
    return command_thought(action, _WHOLE_COMMANDS, _VERBS)
