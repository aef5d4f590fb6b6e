"""The prefix KV cache alone (plain tensors, no model) and the length grouping of prefills."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ipr_core.policies.hf import length_groups  # noqa: E402
from ipr_core.policies.prefix_cache import BLOCK, PrefixCache  # noqa: E402


def kv_for(ids, layers: int = 2):
    """Per-layer (k, v) whose every value encodes (layer, token id, position): what was cached is checkable."""
    t = torch.tensor(ids, dtype=torch.float32)
    pos = torch.arange(len(ids), dtype=torch.float32)
    return [((t * 1000 + pos + layer * 1e6)[None, :, None].expand(1, len(ids), 2).clone(), -(t + layer)[None, :, None].expand(1, len(ids), 2).clone()) for layer in range(layers)]


def test_longest_prefix_across_entries_and_token_exact_extension():
    c = PrefixCache(1 << 30)
    a = list(range(100, 100 + 3 * BLOCK))  # 3 whole blocks
    b = a[: 2 * BLOCK] + [7] * (BLOCK + 5)  # shares 2 blocks with a, then its own tokens
    c.insert(a, kv_for(a))
    c.insert(b, kv_for(b))
    # A prompt that follows b for 2 blocks + 9 tokens, then differs: n = 2*BLOCK + 9 (past the last whole block).
    q = b[: 2 * BLOCK + 9] + [1, 2, 3]
    n, e = c.lookup(q, len(q) - 1)
    assert n == 2 * BLOCK + 9 and e.ids == tuple(b)
    assert torch.equal(e.kv[1][0][:, :n], kv_for(q)[1][0][:, :n])  # the keys of exactly those tokens and positions
    # The cap leaves the prompt's last token to be computed (its logits start the reply).
    n, e = c.lookup(a, len(a) - 1)
    assert n == len(a) - 1 and e.ids == tuple(a)
    # Shorter than a block, or nothing in common: a miss.
    assert c.lookup(a[: BLOCK - 1], BLOCK - 1) == (0, None)
    assert c.lookup([5] * 40, 39) == (0, None)
    assert c.hits == (2 * BLOCK + 9) + len(a) - 1 and c.lookups == 4


def test_hash_collision_or_stale_pointer_never_returns_foreign_kv(monkeypatch):
    import ipr_core.policies.prefix_cache as pcmod

    c = PrefixCache(1 << 30)
    a = list(range(2 * BLOCK))
    c.insert(a, kv_for(a))
    monkeypatch.setattr(pcmod, "_block_hashes", lambda ids, n: [0] * n)  # every block chain collides
    other = [9] * (2 * BLOCK)
    assert c.lookup(other, len(other) - 1) == (0, None)


def test_budget_evicts_least_recently_used_and_refuses_oversized():
    one = kv_for(list(range(BLOCK)))
    size = sum(k.numel() * 4 + v.numel() * 4 for k, v in one)
    c = PrefixCache(3 * size)
    seqs = [[i] * BLOCK for i in range(1, 5)]
    for s in seqs[:3]:
        c.insert(s, kv_for(s))
    assert len(c) == 3 and c.nbytes == 3 * size
    assert c.lookup(seqs[0] + [0], BLOCK)[0] == BLOCK  # touch the oldest: it becomes the newest
    c.insert(seqs[3], kv_for(seqs[3]))  # over budget: evicts seqs[1], the least recently used
    assert len(c) == 3 and c.nbytes <= 3 * size
    assert c.lookup(seqs[1] + [0], BLOCK) == (0, None)
    assert c.lookup(seqs[0] + [0], BLOCK)[0] == BLOCK and c.lookup(seqs[3] + [0], BLOCK)[0] == BLOCK
    big = list(range(4 * BLOCK))
    c.insert(big, kv_for(big))  # alone larger than the budget: not stored, nothing evicted
    assert len(c) == 3 and c.lookup(big, len(big) - 1) == (0, None)
    c.clear()
    assert len(c) == 0 and c.nbytes == 0
    with pytest.raises(ValueError, match=">= 0"):
        PrefixCache(-1)


def test_length_groups_split_long_tails_from_short_ones():
    lengths = [30] * 20 + [240] * 3 + [100] * 9
    groups = length_groups(lengths, overhead=64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [sorted({lengths[i] for i in g}) for g in groups] == [[30], [100], [240]]
    cost = lambda gs: sum(len(g) * max(lengths[i] for i in g) + 64 for g in gs)  # noqa: E731
    assert cost(groups) < cost([list(range(len(lengths)))])
    assert length_groups([50, 52, 55, 60], overhead=64) == [[0, 1, 2, 3]]  # similar lengths: one forward
    assert length_groups([7]) == [[0]] and length_groups([]) == []
    assert len(length_groups(list(range(1, 33)) * 10, overhead=0)) == 4  # capped at max_groups


def test_caches_on_one_budget_hold_it_together_and_evict_the_least_recently_used_of_all():
    from ipr_core.policies.prefix_cache import KVBudget, process_budget

    one = kv_for(list(range(BLOCK)))
    size = sum(k.numel() * 4 + v.numel() * 4 for k, v in one)
    budget = KVBudget(3 * size)
    a, b = PrefixCache(budget), PrefixCache(budget)
    sa, sb = [[i] * BLOCK for i in (1, 2)], [[i] * BLOCK for i in (3, 4)]
    a.insert(sa[0], kv_for(sa[0]))
    b.insert(sb[0], kv_for(sb[0]))
    a.insert(sa[1], kv_for(sa[1]))
    assert budget.nbytes == 3 * size and (len(a), len(b)) == (2, 1)
    assert a.lookup(sa[0] + [0], BLOCK)[0] == BLOCK  # a's oldest is used again: b's entry is now the oldest of all
    b.insert(sb[1], kv_for(sb[1]))
    assert b.lookup(sb[0] + [0], BLOCK) == (0, None)  # evicted from b, though a holds more
    assert (len(a), len(b)) == (2, 1) and budget.nbytes == a.nbytes + b.nbytes == 3 * size
    b.insert(sa[0] + [5] * BLOCK, kv_for(sa[0] + [5] * BLOCK))  # two blocks: two of a's entries go
    assert budget.nbytes <= 3 * size and a.lookup(sa[1] + [0], BLOCK) == (0, None)
    a.clear()
    assert budget.nbytes == b.nbytes and len(budget) == 2
    del b
    import gc

    gc.collect()
    assert budget.nbytes == 0 and len(budget) == 1
    assert process_budget(1 << 20) is process_budget(1 << 20) and process_budget(1 << 20) is not process_budget(1 << 21)
