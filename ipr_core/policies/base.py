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
