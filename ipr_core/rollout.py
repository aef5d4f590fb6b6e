"""The lock-step episode runner shared by expert MC, exploration, agent MC and eval.

Generation dominates IPR's cost, and a model answers a batch of conversations
in little more than the time it answers one (bench/rollouts.py measures it),
so episodes advance together: each turn gathers the context of every live
episode, makes ONE batched ``policy.generate`` call, then steps every
environment (on a thread pool for slow, JVM-backed ones). Finished episodes
free their slot for the next spec. ``_LockStep`` holds a run's state and names
these phases: fill, generate, collect, step-and-retire. A policy with several
lanes (``ReplicatedPolicy``: one per replica process or GPU) gets one cohort
of the slots per lane instead: each cohort's turn goes to its own replica and
the cohort steps on as soon as that replica answers, so no turn waits for the
slowest replica's longest reply.

Semantics (``run_sequential`` is the one-at-a-time reference with the same ones):
- An episode starts from ``spec.prefix``: reset the task, replay the prefix
  actions (docs/algorithm.md, restoring an environment to a prefix), keep the prefix's
  thoughts, take the observations and rewards the replay produces. If the
  episode ends during the replay it is finished with no agent step.
- Turn seeds are ``derive_seed(spec.seed, turn)``, so a trajectory depends on
  its spec alone, never on which other episodes shared its batches.
- A reply without a usable ``Action:`` line is still a step (it costs the step
  budget): the environment is not stepped, the observation tells the model the
  format, the reward stays the previous one. Such a step has ``action == ""``
  (``parse_react`` never returns an empty action), and replaying a prefix skips
  it the same way.
- The step limit (``max_steps`` or ``env.max_steps``) counts prefix steps.
- Outcome reward = the last step's reward (envs/base.py convention), success =
  the last environment result's ``info["success"]``, done = the environment
  said done (False when the step limit cut the episode).
- An exception from the environment (reset, replay or step) closes that
  instance, builds a fresh one and restarts the episode once from scratch;
  a second failure is recorded as a Trajectory with ``error`` set (outcome 0,
  not done, not a success; the steps so far kept for diagnosis). Errors from
  the policy propagate: they concern the whole batch and are retried above.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence, TypeVar

from ipr_core.conversation import render_context
from ipr_core.envs.base import Environment, StepResult
from ipr_core.policies.base import LanedPolicy, Policy, SamplingParams
from ipr_core.progress import bar
from ipr_core.resources import shared_pool
from ipr_core.seeding import derive_seed
from ipr_core.types import MalformedAction, Step, Task, Trajectory, parse_react

log = logging.getLogger(__name__)

MALFORMED_OBSERVATION = "Your reply was malformed: it must end with a line 'Action: ...' (format: 'Thought: ...' then 'Action: ...'). Nothing happened."


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode to run: ``task`` restored to ``prefix``, then the policy plays."""

    key: str  # becomes Trajectory.traj_id
    task: Task
    prefix: tuple[Step, ...] = ()
    seed: int = 0  # turn t generates with derive_seed(seed, t)
    source: str = "agent"


@dataclass(frozen=True)
class RolloutStats:
    episodes: int
    errors: int
    retries: int
    turns: int  # generate rounds
    generated: int  # assistant turns generated
    malformed: int
    wall_s: float
    generate_s: float
    env_s: float
    replay_mismatches: int  # prefix observations that replay did not reproduce
    invalid: int  # well-formed actions the environment did not accept (StepResult.info["invalid"])

    def summary(self) -> str:
        eps = self.episodes / self.wall_s if self.wall_s > 0 else float("inf")
        return (
            f"{self.episodes} episodes in {self.wall_s:.1f}s ({eps:.2f} ep/s): generation {self.generate_s:.1f}s, "
            f"environment {self.env_s:.1f}s, {self.turns} turns, {self.generated} replies ({self.malformed} malformed, {self.invalid} invalid actions), "
            f"{self.errors} errors after {self.retries} retries"
        )


def turn_seed(spec: EpisodeSpec, turn: int) -> int:
    return derive_seed(spec.seed, turn)


def malformed_step(text: str, previous_reward: float) -> Step:
    """The step recorded for a reply with no usable action: the reply verbatim
    as ``thought`` and ``action == ""`` (``Step.assistant_text`` then renders the
    reply as it was), so the next context and training see what was said
    rather than a made-up "Thought: ...\nAction: " that a model would imitate."""
    return Step(text.strip(), "", MALFORMED_OBSERVATION, previous_reward)


def parse_reply(text: str, previous_reward: float) -> tuple[str, str] | Step:
    """(thought, action) for a well-formed reply, else the malformed Step."""
    try:
        return parse_react(text)
    except MalformedAction:
        return malformed_step(text, previous_reward)


# --- one episode's state -----------------------------------------------------------------


@dataclass
class _Episode:
    index: int  # position in specs
    spec: EpisodeSpec
    attempt: int = 1
    system: str = ""
    instruction: str = ""
    steps: list[Step] = field(default_factory=list)
    last: StepResult | None = None
    turn: int = 0
    prefix_len: int = 0
    finished: bool = False
    mismatches: int = 0
    invalid: int = 0  # actions the environment did not accept (its "Nothing happens.")

    @property
    def reward(self) -> float:
        return self.steps[-1].reward if self.steps else 0.0

    def start(self, env: Environment, limit: int) -> None:
        """Reset and replay the prefix; may finish the episode (done or limit)."""
        self.system = env.system_prompt()
        self.instruction = env.reset(self.spec.task)
        for given in self.spec.prefix:
            if given.action == "":  # a malformed prefix step never reached the environment
                self.steps.append(Step(given.thought, "", given.observation, self.reward))
                continue
            r = env.step(given.action)
            self.mismatches += r.observation != given.observation
            self.steps.append(Step(given.thought, _recorded_action(given.action, r), r.observation, float(r.reward)))
            self.last = r
            if r.done:
                break
        self.prefix_len = len(self.steps)
        self.finished = bool(self.last and self.last.done) or len(self.steps) >= limit

    def reply(self, text: str) -> tuple[str, str] | None:
        """Record a malformed reply (returns None) or return the action to take."""
        self.turn += 1
        parsed = parse_reply(text, self.reward)
        if isinstance(parsed, Step):
            self.steps.append(parsed)
            return None
        return parsed

    def record(self, thought: str, action: str, r: StepResult) -> None:
        self.steps.append(Step(thought, _recorded_action(action, r), r.observation, float(r.reward)))
        self.last = r
        self.invalid += bool(r.info.get("invalid"))

    def check_limit(self, limit: int) -> None:
        self.finished = self.finished or bool(self.last and self.last.done) or len(self.steps) >= limit

    def trajectory(self, error: str | None = None) -> Trajectory:
        info = self.last.info if self.last else {}
        return Trajectory(
            traj_id=self.spec.key,
            task=self.spec.task,
            source=self.spec.source,
            system=self.system,
            instruction=self.instruction,
            steps=tuple(self.steps),
            prefix_len=self.prefix_len,
            outcome_reward=self.reward if error is None else 0.0,
            success=bool(info.get("success", False)) and error is None,
            done=bool(self.last and self.last.done) and error is None,
            seed=self.spec.seed,
            error=error,
        )


def _recorded_action(action: str, r: StepResult) -> str:
    """The action as the environment canonicalised it (ScienceWorld records a
    menu answer as the option's text), so that replaying it is exact."""
    return str(r.info.get("action", action))


def _error_text(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _close_quietly(env: Environment | None) -> None:
    if env is None:
        return
    try:
        env.close()
    except Exception as e:  # a crashed env may not close cleanly; it is being replaced anyway
        log.debug("closing a failed environment raised %r", e)


def _generate(policy: Policy, convs: list, sampling: SamplingParams, seeds: list[int], batch_size: int | None) -> list[str]:
    step = batch_size or len(convs)
    out: list[str] = []
    for i in range(0, len(convs), step):
        texts = policy.generate(convs[i : i + step], sampling, seeds[i : i + step])
        _expect_texts(texts, len(convs[i : i + step]))
        out.extend(texts)
    return out


def _expect_texts(texts: list[str], n: int) -> None:
    # A policy that drops or adds a reply would silently shift every later
    # reply onto the wrong episode.
    if len(texts) != n:
        raise RuntimeError(f"policy returned {len(texts)} texts for {n} conversations")


class _OneLane:
    """The ``submit`` / ``collect`` lane interface over a plain policy: one lane,
    answered by a (batched, ``batch_size``-capped) ``generate`` call at collect."""

    lanes = 1

    def __init__(self, policy: Policy, batch_size: int | None):
        self.policy, self.batch_size = policy, batch_size
        self._request: tuple | None = None

    def submit(self, lane: int, convs: list, sampling: SamplingParams, seeds: list[int]) -> None:
        self._request = (convs, sampling, seeds)

    def collect(self) -> tuple[int, list[str]]:
        (convs, sampling, seeds), self._request = self._request, None
        return 0, _generate(self.policy, convs, sampling, seeds, self.batch_size)

    def drain(self) -> None:
        self._request = None


def _lanes(policy: Policy, n_slots: int, batch_size: int | None):
    """The policy's own lanes when it has several and a cohort fits one call, else one lane."""
    if isinstance(policy, LanedPolicy) and policy.lanes > 1 and n_slots >= 2:
        n = min(policy.lanes, n_slots)
        if batch_size is None or -(-n_slots // n) <= batch_size:
            return policy, n
    return _OneLane(policy, batch_size), 1


# --- the lock-step runner ------------------------------------------------------------------

_Row = tuple[int, _Episode]  # (slot, the episode in it)
_T = TypeVar("_T")


class _Move(NamedTuple):
    """A well-formed reply's action, waiting for its environment to step."""

    slot: int
    episode: _Episode
    thought: str
    action: str


@dataclass
class _Tally:
    """The run's counters, turned into ``RolloutStats`` at the end."""

    turns: int = 0
    generated: int = 0
    malformed: int = 0
    retries: int = 0
    errors: int = 0
    mismatches: int = 0
    invalid: int = 0
    generate_s: float = 0.0
    env_s: float = 0.0


class _LockStep:
    """One ``run_episodes`` call: slots of live episodes advanced by phases.

    Each round of ``run`` is: ``fill`` (admit queued episodes into free slots),
    ``generate`` (one batched call per idle lane, then the first lane's answer),
    ``collect`` (parse the replies) and ``step_and_retire`` (step the
    environments, finish episodes, free their slots). ``close`` must follow.
    """

    def __init__(
        self,
        make_env: Callable[[], Environment],
        policy: Policy,
        specs: list[EpisodeSpec],
        sampling: SamplingParams,
        *,
        history: int | None,
        max_steps: int | None,
        workers: int,
        progress: str | None,
        batch_size: int | None,
        n_slots: int,
        on_episode: Callable[[Trajectory], None] | None = None,
    ):
        self.make_env, self.sampling, self.history, self.n_slots = make_env, sampling, history, n_slots
        self.on_episode = on_episode
        self.envs: list[Environment | None] = [None] * n_slots
        self.envs[0] = make_env()  # outside the error isolation: a broken factory fails loudly
        self.limit = max_steps or self.envs[0].max_steps
        self.results: list[Trajectory | None] = [None] * len(specs)
        self.queue: deque[_Episode] = deque(_Episode(i, s) for i, s in enumerate(specs))
        self.active: dict[int, _Episode] = {}  # slot -> episode
        self.tally = _Tally()
        self.bar = bar(len(specs), progress, "ep") if progress else None
        # The process's env pool: runs side by side (concurrent stages) share its threads.
        self.pool = shared_pool("ipr-env", workers) if workers > 1 else None
        self.lanes, self.n_lanes = _lanes(policy, n_slots, batch_size)
        self.in_flight: dict[int, list[_Row]] = {}  # lane -> the rows it is answering

    def run(self) -> None:
        while self.queue or self.active:
            self.fill()
            if not self.active:
                continue
            live, texts = self.generate()
            self.step_and_retire(live, self.collect(live, texts))

    # --- the phases ---

    def fill(self) -> None:
        """Admit queued episodes into free slots (resets and replays in parallel)."""
        # A loop: an episode may end during its replay and free its slot again.
        while self.queue and len(self.active) < self.n_slots:
            free = [s for s in range(self.n_slots) if s not in self.active]
            batch = [(slot, self.queue.popleft()) for slot in free[: len(self.queue)]]
            self.active.update(batch)
            for (slot, ep), exc in zip(batch, self._in_slots(self._start, batch)):
                if exc is not None:
                    self._fail(slot, ep, exc)
                elif ep.finished:
                    self._finish(slot, ep)

    def generate(self) -> tuple[list[_Row], list[str]]:
        """Submit every idle lane's cohort, then wait for the first lane to answer."""
        self._submit_idle_lanes()
        t0 = time.perf_counter()
        lane, texts = self.lanes.collect()
        self.tally.generate_s += time.perf_counter() - t0
        live = self.in_flight.pop(lane)
        _expect_texts(texts, len(live))
        self.tally.turns += 1
        self.tally.generated += len(texts)
        return live, texts

    def collect(self, live: list[_Row], texts: list[str]) -> list[_Move]:
        """Parse each reply: a malformed one is recorded now (it takes no
        environment step); the others come back as moves to step."""
        moves: list[_Move] = []
        for (slot, ep), text in zip(live, texts):
            parsed = ep.reply(text)
            if parsed is None:
                self.tally.malformed += 1
            else:
                moves.append(_Move(slot, ep, *parsed))
        return moves

    def step_and_retire(self, live: list[_Row], moves: list[_Move]) -> None:
        """Step the moves' environments, then finish (or retry) the episodes that ended."""
        excs = self._in_slots(self._step, moves)
        failed = {m.slot: exc for m, exc in zip(moves, excs) if exc is not None}
        for slot, ep in live:
            if slot in failed:
                self._fail(slot, ep, failed[slot])
                continue
            ep.check_limit(self.limit)
            if ep.finished:
                self._finish(slot, ep)

    # --- helpers of the phases ---

    def _submit_idle_lanes(self) -> None:
        # A lane still answering its cohort keeps it: the cohort's episodes wait
        # for that answer rather than being asked twice.
        by_lane: dict[int, list[_Row]] = {}
        for slot, ep in sorted(self.active.items()):
            by_lane.setdefault(slot * self.n_lanes // self.n_slots, []).append((slot, ep))
        for lane, cohort in by_lane.items():
            if lane in self.in_flight:
                continue
            convs = [render_context(ep.system, ep.instruction, ep.steps, self.history) for _, ep in cohort]
            self.lanes.submit(lane, convs, self.sampling, [turn_seed(ep.spec, ep.turn) for _, ep in cohort])
            self.in_flight[lane] = cohort

    def _in_slots(self, fn: Callable[[_T], None], items: Sequence[_T]) -> list[BaseException | None]:
        """fn(item) for each item (on the pool), returning exceptions; counted as environment time."""
        t0 = time.perf_counter()

        def guarded(item: _T) -> BaseException | None:
            return _guard(lambda: fn(item))

        excs = list(self.pool.map(guarded, items)) if self.pool else [guarded(it) for it in items]
        self.tally.env_s += time.perf_counter() - t0
        return excs

    def _start(self, row: _Row) -> None:
        slot, ep = row
        if self.envs[slot] is None:
            self.envs[slot] = self.make_env()
        ep.start(self.envs[slot], self.limit)

    def _step(self, move: _Move) -> None:
        env = self.envs[move.slot]
        assert env is not None  # a slot's env is rebuilt by _start before its episode moves
        move.episode.record(move.thought, move.action, env.step(move.action))

    def _finish(self, slot: int, ep: _Episode, error: str | None = None) -> None:
        self.results[ep.index] = ep.trajectory(error)
        self.tally.errors += error is not None
        self.tally.mismatches += ep.mismatches
        self.tally.invalid += ep.invalid
        self.active.pop(slot, None)
        if self.bar is not None:
            self.bar.update(1)
        if self.on_episode is not None:
            self.on_episode(self.results[ep.index])  # type: ignore[arg-type]

    def _fail(self, slot: int, ep: _Episode, exc: BaseException) -> None:
        _close_quietly(self.envs[slot])
        self.envs[slot] = None  # rebuilt lazily (in the pool) by the next start
        if ep.attempt == 1:
            self.tally.retries += 1
            log.warning("episode %s: environment failed (%s); retrying from scratch", ep.spec.key, _error_text(exc))
            self.active.pop(slot, None)
            # At the front: the retry takes the next free slot, not the end of the queue.
            self.queue.appendleft(_Episode(ep.index, ep.spec, attempt=2))
        else:
            log.warning("episode %s: environment failed again (%s); recorded as an error", ep.spec.key, _error_text(exc))
            self._finish(slot, ep, _error_text(exc))

    # --- the end ---

    def close(self) -> None:
        if self.in_flight:  # stopped by an error: the other lanes' replies must not reach a later call
            self.lanes.drain()
        for env in self.envs:
            _close_quietly(env)
        if self.bar is not None:
            self.bar.close()

    def stats(self, wall_s: float) -> RolloutStats:
        t = self.tally
        return RolloutStats(len(self.results), t.errors, t.retries, t.turns, t.generated, t.malformed, wall_s, t.generate_s, t.env_s, t.mismatches, t.invalid)

    def trajectories(self) -> list[Trajectory]:
        assert all(r is not None for r in self.results)
        return self.results  # type: ignore[return-value]


def run_episodes(
    make_env: Callable[[], Environment],
    policy: Policy,
    specs: Sequence[EpisodeSpec],
    sampling: SamplingParams,
    *,
    history: int | None,
    max_steps: int | None = None,
    workers: int = 1,
    progress: str | None = None,
    batch_size: int | None = None,
    concurrency: int | None = None,
    on_stats: Callable[[RolloutStats], None] | None = None,
    on_episode: Callable[[Trajectory], None] | None = None,
) -> list[Trajectory]:
    """Run every spec to the end, many episodes per generate call.

    Returns trajectories in the order of ``specs``. ``concurrency`` is the number
    of episodes in flight (one environment instance each; default ``batch_size``,
    else 32); ``batch_size`` caps the conversations per generate call;
    ``workers`` threads step the environments; ``on_stats`` receives the
    run's counters and timings (also logged as one summary line);
    ``on_episode`` each trajectory as soon as it is final (in finishing
    order, on the calling thread: e.g. to persist results as they come). With a
    policy of several lanes, the slots are cut into one contiguous block per
    lane (consecutive specs, such as an MC state's N rollouts, mostly land in
    one block and so on one replica, which prefills their shared prompt once)
    and each block's turns go to its own lane (see the module docstring);
    ``gen_s`` is then the time spent waiting for a lane to answer.
    """
    specs = list(specs)
    if len({s.key for s in specs}) != len(specs):
        raise ValueError("EpisodeSpec keys must be unique (they become traj_id)")
    if not specs:
        return []
    n_slots = max(1, min(len(specs), concurrency or batch_size or 32))
    t_start = time.perf_counter()
    run = _LockStep(make_env, policy, specs, sampling, history=history, max_steps=max_steps, workers=workers, progress=progress, batch_size=batch_size, n_slots=n_slots, on_episode=on_episode)
    try:
        run.run()
    finally:
        run.close()

    stats = run.stats(time.perf_counter() - t_start)
    log.info("rollouts%s: %s", f" ({progress})" if progress else "", stats.summary())
    if on_stats is not None:
        on_stats(stats)
    if stats.replay_mismatches:
        log.warning("%d replayed prefix observations differ from the recorded ones: the environment may not replay exactly", stats.replay_mismatches)
    return run.trajectories()


def run_sequential(
    make_env: Callable[[], Environment],
    policy: Policy,
    specs: Sequence[EpisodeSpec],
    sampling: SamplingParams,
    *,
    history: int | None,
    max_steps: int | None = None,
) -> list[Trajectory]:
    """Reference implementation: one episode at a time, one generate call per turn.

    Same semantics as ``run_episodes`` (seeds, malformed replies, limits, one
    retry on environment failure); kept deliberately plain so tests and the
    benchmark can compare the lock-step runner against it.
    """
    env = make_env()
    limit = max_steps or env.max_steps
    out: list[Trajectory] = []
    try:
        for i, spec in enumerate(specs):
            for attempt in (1, 2):
                ep = _Episode(i, spec, attempt=attempt)
                exc = _guard(lambda: ep.start(env, limit))
                while exc is None and not ep.finished:
                    conv = render_context(ep.system, ep.instruction, ep.steps, history)
                    [text] = policy.generate([conv], sampling, [turn_seed(spec, ep.turn)])  # policy errors propagate
                    parsed = ep.reply(text)
                    if parsed is not None:
                        exc = _guard(lambda: ep.record(parsed[0], parsed[1], env.step(parsed[1])))
                    ep.check_limit(limit)
                if exc is None:
                    out.append(ep.trajectory())
                    break
                _close_quietly(env)
                env = make_env()
                if attempt == 2:
                    out.append(ep.trajectory(_error_text(exc)))
    finally:
        _close_quietly(env)
    return out


def _guard(fn: Callable[[], None]) -> BaseException | None:
    try:
        fn()
        return None
    except Exception as e:  # isolated per episode; see module docstring
        return e


