"""The one policy protocol every generation backend implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from ipr_core.types import Message


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64


class PolicyError(RuntimeError):
    """Generation failed (server down, timeout after retries): transient, retryable."""


@runtime_checkable
class Policy(Protocol):
    def generate(self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams, seeds: Sequence[int]) -> list[str]:
        """One assistant turn per conversation, stopping at the end of the turn.

        ``seeds[i]`` fixes the sampling of conversation i: the same request with
        the same seed returns the same text, whatever else is in the batch.
        """

    def close(self) -> None:
        """Release the model / connections."""


@runtime_checkable
class LanedPolicy(Policy, Protocol):
    """Optional: a policy with several independent request lanes (``ReplicatedPolicy``:
    one per replica). The lock-step runner gives each lane its own cohort of
    episodes, so a cohort goes on as soon as its lane answers."""

    lanes: int

    def submit(self, lane: int, conversations: Sequence[Sequence[Message]], sampling: SamplingParams, seeds: Sequence[int]) -> None:
        """Start one generate call on ``lane`` (at most one in flight per lane) without waiting."""

    def collect(self) -> tuple[int, list[str]]:
        """(lane, texts) of the first lane in flight to answer."""

    def drain(self) -> None:
        """Wait for every lane in flight and drop its texts."""

