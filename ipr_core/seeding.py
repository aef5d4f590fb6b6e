"""Seeds derived from their coordinates with hashlib.

Python's ``hash`` of strings changes per process, so it cannot make reruns
reproducible; a blake2b digest of the coordinates can. Every random choice in
ipr_core takes a seed from ``derive_seed(run_seed, *coords)`` where coords are
e.g. (stage, iteration, task_id, step, rollout).
"""

from __future__ import annotations

import hashlib


def derive_seed(*coords: object) -> int:
    """A 63-bit seed that depends only on ``coords`` (order matters)."""
    text = "\x1f".join(repr(c) for c in coords)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1
