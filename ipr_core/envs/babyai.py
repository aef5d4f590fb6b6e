"""BabyAI (minigrid) as a text environment: the fast default for demos and CI.

The agent sees a short egocentric description of its partial view, e.g.
"You see: a red ball 2 steps forward, 1 step left; a wall 3 steps forward."
and answers with one of a few text commands. Episodes replay exactly from the
task's seed (minigrid's dynamics are deterministic). The expert is minigrid's
own ``BabyAIBot``, with short templated thoughts derived from the state.

Reward (BabyAI's own): ``1 - 0.9 * steps / max_steps`` on success, else 0. The
minigrid level is built with our ``max_steps`` so its step counter, truncation
and reward agree with the episode limit here; invalid commands are sent as
minigrid's no-op ``done`` action so that they cost a step like any other.

Splits: a task's layout (grid, agent pose, mission) is hashed into one of ten
buckets; train takes buckets 0-7, dev 8, test 9. Train and test therefore never
share a layout, even on levels with few distinct layouts, where disjoint seeds
alone would still repeat layouts across splits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
from typing import Annotated, Any

import numpy as np
from pydantic import BeforeValidator, Field

from ipr_core.envs.base import ConfiguredEnv, StepResult, check_split, require_episode
from ipr_core.envs.registry import EnvOptions, comma_separated, one_of, subset_of
from ipr_core.seeding import derive_seed
from ipr_core.types import Task

NAV_ACTIONS = ("turn left", "turn right", "move forward")
ALL_ACTIONS = NAV_ACTIONS + ("pick up", "drop", "toggle")
_ACTION_IDS = {"turn left": 0, "turn right": 1, "move forward": 2, "pick up": 3, "drop": 4, "toggle": 5}
_ID_TO_ACTION = {v: k for k, v in _ACTION_IDS.items()}
_NOOP = 6  # minigrid's `done`: changes nothing, but counts as a step

# Single-room navigation levels need only the three moves; other levels keep
# the full command set (doors, pick-up, put-next).
_NAV_LEVELS = ("GoToRedBallNoDists", "GoToRedBallGrey", "GoToRedBall", "GoToObj", "GoToLocal")

# ~2x the bot's 99th-percentile episode length (measured over 1,000 seeds: p99
# 11 steps on the first three, 14 on GoToLocal and PickupLoc).
DEFAULT_MAX_STEPS = {
    "BabyAI-GoToRedBallNoDists-v0": 20,
    "BabyAI-GoToRedBallGrey-v0": 20,
    "BabyAI-GoToRedBall-v0": 25,
    "BabyAI-GoToObj-v0": 20,
    "BabyAI-GoToObjS4-v0": 20,
    "BabyAI-GoToObjS6-v0": 20,
    "BabyAI-GoToLocalS8N2-v0": 20,
    "BabyAI-GoToLocal-v0": 25,
    "BabyAI-PickupLoc-v0": 25,
}

_STDOUT_LOCK = threading.Lock()

SPLIT_BUCKETS = {"train": range(0, 8), "dev": range(8, 9), "test": range(9, 10)}
_MAX_CANDIDATES_PER_TASK = 200  # give up (loudly) when a level has too few layouts


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _obj_name(obj: Any) -> str:
    if obj.type == "door":
        state = "locked" if obj.is_locked else "open" if obj.is_open else "closed"
        return f"{state} {obj.color} door"
    if obj.type in ("goal", "lava"):
        return obj.type
    return f"{obj.color} {obj.type}"


def _article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def _offset(fwd: int, right: int) -> str:
    """Egocentric position as in the observation: '2 steps forward, 1 step left'."""
    parts = []
    if fwd > 0:
        parts.append(_plural(fwd, "step") + " forward")
    elif fwd < 0:
        parts.append(_plural(-fwd, "step") + " back")
    if right > 0:
        parts.append(_plural(right, "step") + " right")
    elif right < 0:
        parts.append(_plural(-right, "step") + " left")
    return ", ".join(parts) or "here"


def describe_view(u: Any, with_inventory: bool) -> str:
    """Compact text of the agent's partial view (occlusion-aware, as minigrid's obs).

    Objects are listed nearest first; of the walls only the one straight ahead
    is named, which is what navigation needs and keeps observations short.
    """
    grid, vis = u.gen_obs_grid()
    size = u.agent_view_size
    cx, cy = size // 2, size - 1  # the agent's cell in the view, facing "up"
    seen: list[tuple[int, int, int, str]] = []
    wall_ahead = None
    for j in range(size):
        for i in range(size):
            if not vis[i, j] or (i, j) == (cx, cy):
                continue
            cell = grid.get(i, j)
            if cell is None:
                continue
            fwd, right = cy - j, i - cx
            if cell.type == "wall":
                if right == 0 and (wall_ahead is None or fwd < wall_ahead):
                    wall_ahead = fwd
                continue
            seen.append((abs(fwd) + abs(right), fwd, right, _article(_obj_name(cell))))
    seen.sort()
    items = [f"{name} {_offset(f, r)}" for _, f, r, name in seen]
    if wall_ahead is not None:
        items.append(f"a wall {_plural(wall_ahead, 'step')} forward")
    text = "You see: " + ("; ".join(items) if items else "nothing") + "."
    if with_inventory:
        carried = f"You carry {_article(_obj_name(u.carrying))}." if u.carrying else "You carry nothing."
        text = f"{carried} {text}"
    return text


def babyai_levels() -> list[str] | None:
    """The BabyAI level ids minigrid registers with gymnasium, None when minigrid is not installed."""
    try:
        import gymnasium as gym
        import minigrid  # noqa: F401  (registers the BabyAI levels with gymnasium)
    except ImportError:
        return None
    return sorted(k for k in gym.envs.registry if k.startswith("BabyAI-"))


def default_actions(level: str) -> tuple[str, ...]:
    """The three moves on single-room navigation levels, all six commands elsewhere."""
    short = level.removeprefix("BabyAI-").split("-v")[0]
    return NAV_ACTIONS if short.startswith(_NAV_LEVELS) else ALL_ACTIONS


class BabyAIOptions(EnvOptions):
    """Options of ``babyai``."""

    level: Annotated[str, one_of("BabyAI level", babyai_levels)] = Field("BabyAI-GoToObj-v0", description="A BabyAI level id that minigrid registers (BabyAI-<name>-v<N>).")
    actions: Annotated[tuple[str, ...] | None, BeforeValidator(comma_separated), subset_of("BabyAI actions", ALL_ACTIONS)] = Field(
        None, description=f"The commands the agent may use, from {list(ALL_ACTIONS)}; None: default_actions(level)."
    )


class BabyAIEnv(ConfiguredEnv, name="babyai", options=BabyAIOptions):
    """A minigrid BabyAI level behind the ``Environment`` protocol."""

    def _configure(self, o: BabyAIOptions) -> None:
        self.level = o.level
        self.actions: tuple[str, ...] = o.actions if o.actions is not None else default_actions(o.level)
        self.max_steps = int(o.max_steps or DEFAULT_MAX_STEPS.get(o.level) or self._level_max_steps())
        # The level itself enforces the same limit and computes its reward with it.
        self._env = self._make(max_steps=self.max_steps)
        self._with_inventory = "pick up" in self.actions
        self._task: Task | None = None

    def _make(self, **kwargs: Any) -> Any:
        import gymnasium as gym
        import minigrid  # noqa: F401  (registers the BabyAI levels with gymnasium)

        try:
            return gym.make(self.level, **kwargs).unwrapped
        except gym.error.Error as e:
            raise ValueError(f"unknown BabyAI level {self.level!r}: {e}") from None

    def _level_max_steps(self) -> int:
        """A level outside DEFAULT_MAX_STEPS: its own limit, which it sets on reset from the maze size."""
        probe = self._make()
        with _STDOUT_LOCK, contextlib.redirect_stdout(io.StringIO()):
            probe.reset(seed=0)
        return int(probe.max_steps)

    # --- tasks --------------------------------------------------------------------

    def _reset_to(self, seed: int) -> None:
        # Some levels print "Sampling rejected: ..." while placing objects, which
        # would litter the CLI's output. redirect_stdout swaps the process-wide
        # sys.stdout, so concurrent resets (threaded runners) take turns.
        with _STDOUT_LOCK, contextlib.redirect_stdout(io.StringIO()):
            self._env.reset(seed=seed)

    def _layout_digest(self) -> str:
        u = self._env
        payload = b"|".join([u.grid.encode().tobytes(), np.asarray(u.agent_pos).tobytes(), bytes([u.agent_dir]), u.mission.encode()])
        return hashlib.blake2b(payload, digest_size=8).hexdigest()

    def list_tasks(self, split: str, n: int | None = None, seed: int = 0) -> list[Task]:
        """The first ``n`` distinct layouts of ``split`` in the seed sequence of ``seed``.

        Prefix-stable: ``list_tasks(s, 10)`` is the start of ``list_tasks(s, 100)``.
        BabyAI has no finite task list, so ``n`` is required.
        """
        check_split(self.name, split, sorted(SPLIT_BUCKETS))
        if n is None:
            raise ValueError("babyai generates tasks on demand: pass n")
        buckets = SPLIT_BUCKETS[split]
        short = self.level.removeprefix("BabyAI-").split("-v")[0]
        tasks: list[Task] = []
        seen: set[str] = set()
        i = 0
        while len(tasks) < n:
            if i > _MAX_CANDIDATES_PER_TASK * (n + 1):
                raise ValueError(f"{self.level} has too few distinct layouts for {n} {split} tasks (found {len(tasks)})")
            # 31 bits: any numpy/gymnasium seeding accepts it.
            task_seed = derive_seed("babyai", self.level, seed, i) & 0x7FFFFFFF
            i += 1
            self._reset_to(task_seed)
            digest = self._layout_digest()
            if int(digest, 16) % 10 not in buckets or digest in seen:
                continue
            seen.add(digest)
            tasks.append(Task(f"{short}-{digest[:12]}", self.name, split, task_seed, {"level": self.level, "mission": self._env.mission}))
        self._done = True  # listing moved the level: a reset is needed before stepping
        return tasks

    # --- episode ------------------------------------------------------------------

    def system_prompt(self) -> str:
        extra = ""
        if "pick up" in self.actions:
            extra = " 'pick up' takes the object right in front of you, 'drop' puts what you carry in front of you, 'toggle' opens or closes the door in front of you."
        return (
            "You are an agent in a grid world. Complete the mission in as few steps as possible.\n"
            "Each turn you are told what you see, relative to you: steps forward, steps left or right. "
            "You only see what is in front of you. To go to an object, stand next to it and face it."
            f"{extra}\n"
            f"Valid actions: {', '.join(self.actions)}.\n"
            "Reply in this format:\nThought: <one short sentence>\nAction: <one valid action>"
        )

    def reset(self, task: Task) -> str:
        level = task.meta.get("level", self.level)
        if level != self.level:
            raise ValueError(f"task {task.task_id} is for level {level!r}, this environment runs {self.level!r}")
        self._reset_to(task.seed)
        self._task = task
        self._t = 0
        self._done = False
        return f"Your mission: {self._env.mission}.\n{self._describe()}"

    def _describe(self) -> str:
        return describe_view(self._env, self._with_inventory)

    def step(self, action: str) -> StepResult:
        require_episode(self._done)
        text = " ".join(action.lower().split()).rstrip(".")
        invalid = text not in self.actions
        _, reward, terminated, truncated, _ = self._env.step(_NOOP if invalid else _ACTION_IDS[text])
        self._t += 1
        success = bool(terminated and reward > 0)
        truncated = bool(not terminated and (truncated or self._t >= self.max_steps))
        self._done = bool(terminated or truncated)
        obs = self._describe()
        if invalid:
            obs = f"Invalid action {action.strip()[:60]!r}. Valid actions: {', '.join(self.actions)}. {obs}"
        elif success:
            obs = f"Mission accomplished. {obs}"
        return StepResult(obs, float(reward) if success else 0.0, self._done, {"success": success, "invalid": invalid, "truncated": truncated, "steps": self._t})

    # --- expert -------------------------------------------------------------------

    def expert(self, task: Task) -> list[tuple[str, str]] | None:
        """The BabyAI bot's actions with templated thoughts, until the episode ends."""
        from minigrid.utils.baby_ai_bot import BabyAIBot

        self.reset(task)
        bot = BabyAIBot(self._env)
        out: list[tuple[str, str]] = []
        while not self._done:
            action_id = int(bot.replan())
            action = _ID_TO_ACTION.get(action_id)
            if action is None or action not in self.actions:
                raise ValueError(f"the BabyAI bot chose {action_id} ({action}), outside this level's actions {list(self.actions)}")
            out.append((_thought(self._env, bot, action), action))
            self.step(action)
        self._done = True
        return out

    def close(self) -> None:
        self._env.close()


# --- expert thoughts --------------------------------------------------------------


def _target(u: Any, bot: Any) -> tuple[str, tuple[int, int] | None] | None:
    """The object the bot is heading for: its name and, once seen, its egocentric offset."""
    from minigrid.core.world_object import WorldObj
    from minigrid.envs.babyai.core.verifier import ObjDesc

    for goal in reversed(bot.stack):
        datum = getattr(goal, "datum", None)
        if isinstance(datum, WorldObj):
            return _obj_name(datum), _rel(u, datum.cur_pos)
        if isinstance(datum, ObjDesc):
            name = " ".join(p for p in (datum.color, datum.type or "object") if p)
            known = [tuple(p) for p, o in zip(datum.obj_poss, datum.obj_set) if o is not u.carrying and bot.vis_mask[tuple(p)]]
            if not known:
                return name, None
            pos = min(known, key=lambda p: (abs(p[0] - u.agent_pos[0]) + abs(p[1] - u.agent_pos[1]), p))
            return name, _rel(u, pos)
    return None


def _rel(u: Any, pos: Any) -> tuple[int, int]:
    d = np.asarray(pos) - np.asarray(u.agent_pos)
    return int(d @ u.dir_vec), int(d @ u.right_vec)


def _where(fwd: int, right: int) -> str:
    parts = []
    if fwd:
        parts.append(f"{_plural(abs(fwd), 'step')} {'ahead' if fwd > 0 else 'behind'}")
    if right:
        parts.append(f"{abs(right)} to the {'right' if right > 0 else 'left'}")
    return " and ".join(parts) or "here"


_VERB = {"turn left": "turn left", "turn right": "turn right", "move forward": "move forward", "pick up": "pick it up", "drop": "drop it", "toggle": "open it"}


def _thought(u: Any, bot: Any, action: str) -> str:
    """One deterministic sentence from the state: where the target is and what follows."""
    fwd_cell = u.grid.get(*u.front_pos)
    if action == "toggle" and fwd_cell is not None:
        return f"The {_obj_name(fwd_cell)} is in front of me, so I toggle it."
    if action == "pick up" and fwd_cell is not None:
        return f"The {_obj_name(fwd_cell)} is right in front of me, so I pick it up."
    if action == "drop" and u.carrying is not None:
        return f"I drop the {_obj_name(u.carrying)} here."
    target = _target(u, bot)
    verb = _VERB[action]
    if target is None:
        return f"I {verb}."
    name, rel = target
    if rel is None:
        return f"I do not see the {name} yet, so I {verb} to look for it."
    return f"The {name} is {_where(*rel)}, so I {verb}."
