"""Reuse of computed KV across generate calls: automatic prefix caching.

The lock-step runner asks, turn after turn, for the continuation of
conversations whose prompts start with what the previous call already ran
through the model: the system prompt (every episode), the task (every turn of
an episode), and, until the history window starts to slide, the whole previous
turn (its prompt, its generated reply). Prefill is compute-bound on a CPU, so
re-running those tokens dominated the batched runner's cost. This cache keeps
the per-layer keys/values of finished rows (prompt + the tokens fed while
decoding) and hands back the longest stored prefix of a new prompt, in the
manner of vLLM's automatic prefix caching:

- Lookup is by token ids, never by text: a re-encoded reply that tokenizes
  differently from the sampled tokens just matches less. Keys and values of a
  token depend only on the tokens before it (causal attention, positions are
  absolute), so a prefix's KV is the same in every prompt that starts with it.
  The only difference from recomputing is floating-point rounding (other GEMM
  shapes), as with any batching.
- Entries are found through a chain hash of fixed-size token blocks (the
  deepest stored block chain of the prompt), then extended token by token and
  verified against the entry's ids, so a hash collision can only cost a miss.
  A block chain points to the newest entry holding it; an older entry that
  matches a few more tokens past the last common whole block is not searched
  (at most BLOCK - 1 tokens recomputed).
- A byte budget bounds the memory; the least recently used entries go first.
  The budget is the process's (``KVBudget``, ``process_budget``): every cache
  drawing on it (the policies of stages that run side by side in one
  process, the scorer's and the agent's) holds at most that much together,
  and eviction picks the least recently used entry among all of them, as one
  shared cache would. What stays cached only changes which tokens are
  recomputed, so sharing changes speed, not what is generated (beyond the
  rounding noted above).

Plain data in, plain data out: no model code here, so it is tested alone.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence

from ipr_core.resources import process_wide

BLOCK = 16  # tokens per hash block; matches shorter than one block are not worth a lookup


@dataclass(frozen=True)
class Entry:
    """One cached sequence: its token ids and per-layer (keys, values), each
    tensor shaped [kv_heads, len(ids), head_dim] (one row, no batch axis)."""

    ids: tuple[int, ...]
    kv: tuple[tuple[Any, Any], ...]
    nbytes: int


def _block_hashes(ids: Sequence[int], n_blocks: int) -> list[int]:
    out, h = [], 0
    for b in range(n_blocks):
        h = hash((h, tuple(ids[b * BLOCK : (b + 1) * BLOCK])))
        out.append(h)
    return out


class KVBudget:
    """Bytes of KV that the caches drawing on it may hold together.

    One lock guards the budget and every cache on it, so caches used from
    different threads (concurrent stages) stay consistent; a lookup or an
    insert is short next to the forward pass it saves.
    """

    def __init__(self, limit_bytes: int):
        if limit_bytes < 0:
            raise ValueError(f"prefix cache budget must be >= 0 bytes, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self.nbytes = 0
        self.lock = threading.RLock()
        self._caches: "weakref.WeakSet[PrefixCache]" = weakref.WeakSet()
        self._tick = 0

    def __len__(self) -> int:
        """Caches drawing on this budget now."""
        return len(self._caches)

    def _register(self, cache: "PrefixCache") -> None:
        with self.lock:
            self._caches.add(cache)

    def _next_tick(self) -> int:
        self._tick += 1
        return self._tick

    def _make_room(self) -> None:
        """Evict least recently used entries, across all caches, until within the limit."""
        while self.nbytes > self.limit_bytes:
            oldest = min((c for c in self._caches if c._entries), key=lambda c: c._oldest_tick(), default=None)
            if oldest is None:
                return
            oldest._evict_oldest()


def process_budget(limit_bytes: int) -> KVBudget:
    """The process's budget of ``limit_bytes`` (one per distinct limit, created
    on first use): what ``sampling.prefix_cache_mb`` bounds."""
    return process_wide(("kv-budget", limit_bytes), lambda: KVBudget(limit_bytes))


class PrefixCache:
    """LRU store of KV for token sequences, looked up by longest common prefix.

    ``budget``: a byte count (a budget of its own) or a ``KVBudget`` shared
    with other caches.
    """

    def __init__(self, budget: "int | KVBudget"):
        self.budget = budget if isinstance(budget, KVBudget) else KVBudget(budget)
        self.budget._register(self)
        self.nbytes = 0  # this cache's share of the budget
        self._entries: OrderedDict[int, list[Any]] = OrderedDict()  # id -> [entry, its block hashes, last use tick]
        self._by_block: dict[int, int] = {}  # chain hash of blocks 0..k -> newest entry id holding them
        self._next = 0
        self.hits = 0  # tokens served from the cache
        self.lookups = 0

    @property
    def budget_bytes(self) -> int:
        return self.budget.limit_bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __del__(self) -> None:
        # A dropped policy's cache gives its bytes back to a shared budget.
        try:
            self.clear()
        except Exception:  # interpreter shutdown
            pass

    def clear(self) -> None:
        with self.budget.lock:
            self._entries.clear()
            self._by_block.clear()
            self.budget.nbytes -= self.nbytes
            self.nbytes = 0

    def lookup(self, ids: Sequence[int], max_len: int) -> tuple[int, Entry | None]:
        """(n, entry): the entry's first n tokens equal ``ids[:n]``, n <= max_len,
        n as large as the stored block chains allow; (0, None) on a miss."""
        with self.budget.lock:
            return self._lookup(ids, max_len)

    def _lookup(self, ids: Sequence[int], max_len: int) -> tuple[int, Entry | None]:
        self.lookups += 1
        max_len = min(max_len, len(ids))
        if max_len < BLOCK or not self._entries:
            return 0, None
        found = None
        # Whole blocks of the prompt, even past max_len (the last token must be
        # recomputed, not the block around it): the deepest chain finds the entry.
        for h in _block_hashes(ids, len(ids) // BLOCK):
            eid = self._by_block.get(h)
            if eid is None:
                break
            found = eid
        if found is None:
            return 0, None
        slot = self._entries[found]
        entry = slot[0]
        self._entries.move_to_end(found)
        slot[2] = self.budget._next_tick()
        n = 0
        limit = min(max_len, len(entry.ids))
        # Verify the blocks (a hash collision must not hand out foreign KV),
        # then extend past the last whole block token by token.
        while n < limit and entry.ids[n] == ids[n]:
            n += 1
        if n < BLOCK:
            return 0, None
        self.hits += n
        return n, entry

    def insert(self, ids: Sequence[int], kv: Sequence[tuple[Any, Any]]) -> None:
        """Store the KV of ``ids`` (dropped at once when it alone exceeds the budget)."""
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if len(ids) < BLOCK or nbytes > self.budget_bytes:
            return
        entry = Entry(tuple(ids), tuple((k, v) for k, v in kv), nbytes)
        hashes = _block_hashes(entry.ids, len(entry.ids) // BLOCK)
        with self.budget.lock:
            eid = self._next
            self._next += 1
            self._entries[eid] = [entry, hashes, self.budget._next_tick()]
            for h in hashes:
                self._by_block[h] = eid
            self.nbytes += nbytes
            self.budget.nbytes += nbytes
            self.budget._make_room()

    def _oldest_tick(self) -> int:
        return next(iter(self._entries.values()))[2]

    def _evict_oldest(self) -> None:
        eid, (entry, hashes, _) = self._entries.popitem(last=False)
        self.nbytes -= entry.nbytes
        self.budget.nbytes -= entry.nbytes
        for h in hashes:
            if self._by_block.get(h) == eid:
                del self._by_block[h]
