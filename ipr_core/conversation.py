"""How trajectories become chat messages, for generation and for training alike.

A trajectory renders as::

    system      env.system_prompt()
    user        instruction (the task and the initial observation)
    assistant   "Thought: ...\\nAction: ..."      step 1
    user        "Observation: ..."                 step 1's observation
    assistant   ...                                step 2
    ...

Small models cannot hold long histories, so ``history`` keeps only the last H
steps before the turn being generated (None = the full history, as the paper).
Generation and training MUST use the same window, so both go through
``window`` below: the policy sees exactly the context it is trained on.

One exception, on purpose: an in-context example (``with_example``: a solved
task before the instruction, the papers' one-shot setting for pretrained
models) is shown when generating (``render_context``) and left out of
training data (``trajectory_messages``, which SFT rows and pairs are built
from), so a trained model learns the task, not the example.
"""

from __future__ import annotations

from typing import Sequence

from ipr_core.types import Message, Step

OBS_PREFIX = "Observation: "
_EXAMPLE_HEAD = "Here is an example of a task solved step by step.\n\n"
_EXAMPLE_TAIL = "\n\nThat was the example. Now it is your turn.\n\n"


def with_example(example: str, instruction: str) -> str:
    """``instruction`` preceded by an in-context example (what generation shows)."""
    if _EXAMPLE_TAIL in example:
        raise ValueError("an in-context example must not contain the text that ends examples")
    return _EXAMPLE_HEAD + example + _EXAMPLE_TAIL + instruction


def without_example(instruction: str) -> str:
    """``instruction`` with a leading ``with_example`` example removed (what training sees)."""
    if instruction.startswith(_EXAMPLE_HEAD) and _EXAMPLE_TAIL in instruction:
        return instruction.split(_EXAMPLE_TAIL, 1)[1]
    return instruction


def observation_message(observation: str) -> Message:
    return {"role": "user", "content": OBS_PREFIX + observation}


def step_messages(steps: Sequence[Step], include_last_observation: bool = True) -> list[Message]:
    out: list[Message] = []
    for i, s in enumerate(steps):
        out.append({"role": "assistant", "content": s.assistant_text()})
        if include_last_observation or i < len(steps) - 1:
            out.append(observation_message(s.observation))
    return out


def trajectory_messages(system: str, instruction: str, steps: Sequence[Step], include_last_observation: bool = False, example: bool = False) -> list[Message]:
    """The full conversation of a trajectory (the TRL conversational form), as
    training data has it: an in-context example is dropped unless ``example``."""
    first = instruction if example else without_example(instruction)
    head: list[Message] = [{"role": "system", "content": system}, {"role": "user", "content": first}]
    return head + step_messages(steps, include_last_observation)


def window(messages: Sequence[Message], end: int, history: int | None) -> list[Message]:
    """Context before message index ``end``: the head (system + instruction) and
    the last ``history`` steps (assistant + observation pairs) before ``end``."""
    head = list(messages[:2])
    body = list(messages[2:end])
    if history is not None:
        body = body[len(body) - 2 * history :] if history > 0 else []
    return head + body


def render_context(system: str, instruction: str, steps: Sequence[Step], history: int | None) -> list[Message]:
    """Messages the policy sees before generating the step after ``steps`` (an in-context example included)."""
    msgs = trajectory_messages(system, instruction, steps, include_last_observation=True, example=True)
    return window(msgs, len(msgs), history)


def segments(messages: Sequence[Message], n_prompt: int, history: int | None) -> list[tuple[list[Message], list[bool]]]:
    """Training segments of ``messages`` whose targets are the assistant turns at
    index >= ``n_prompt``. Each segment is (messages, is_target per message).

    With the full history (None) a trajectory is one segment with several target
    turns; with a window, one segment per target turn, each with the context the
    policy saw when it generated that turn. Summing a side's log-probs over its
    segments gives log pi(side | prompt) either way.
    """
    targets = [i for i in range(n_prompt, len(messages)) if messages[i]["role"] == "assistant"]
    if not targets:
        return []
    if history is None:
        last = targets[-1] + 1
        msgs = list(messages[:last])
        return [(msgs, [i in set(targets) for i in range(last)])]
    out = []
    for i in targets:
        ctx = window(messages, i, history)
        out.append((ctx + [messages[i]], [False] * len(ctx) + [True]))
    return out
