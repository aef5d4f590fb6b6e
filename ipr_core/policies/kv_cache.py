"""The decode loop's KV buffers: reserved room, cached heads, merged prefills, dropped rows.

``hf.TransformersPolicy`` drives a transformers ``DynamicCache`` by hand
rather than through ``model.generate`` (docs/models.md, generation notes).
What it needs from the cache lives here: layers that append into room
reserved at prefill (``ReservedLayer``), a batch's cached prompt heads
written into a fresh cache, several prefills merged into one decode cache,
and finished rows dropped by moving only the rows that must move.

torch and transformers are imported inside the functions, as in ``hf``, so
importing this module costs nothing where no model runs.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence


class _ReservedRows:
    """``DynamicLayer`` behaviour with reserved room, mixed into ``ReservedLayer``.

    ``DynamicLayer.update`` concatenates the whole layer for every new token:
    O(length) copying per step, a large share of CPU decode time (measured by
    bench/rollouts.py). Here the keys/values live in buffers with ``room``
    spare columns (the reply's token budget), so a decode step is a slice
    write; ``keys`` and ``values`` are views of the first ``_n`` columns. A
    buffer grows (by a copy) only when an update outruns the room.
    """

    def __init__(self, room: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self._room = room

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._n = 0
            self._kv = None
        n = self._n + key_states.shape[-2]
        if self._kv is None or n > self._kv[0].shape[-2]:
            self._kv = tuple(self._grown(old, new, n) for old, new in zip(self._kv or (None, None), (key_states, value_states)))
        self._kv[0][..., self._n : n, :] = key_states
        self._kv[1][..., self._n : n, :] = value_states
        self._n = n
        self._set_kv(self._kv)
        return self.keys, self.values

    def _grown(self, old, new, n: int):
        """A buffer for ``n`` columns plus the room, holding ``old``'s first ``_n``."""
        buf = new.new_empty(*new.shape[:-2], n + self._room, new.shape[-1])
        if old is not None:
            buf[..., : self._n, :] = old[..., : self._n, :]
        return buf

    def _set_kv(self, kv) -> None:
        """New buffers; ``keys``/``values`` are their first ``_n`` columns."""
        self._kv = kv
        self.keys, self.values = kv[0][..., : self._n, :], kv[1][..., : self._n, :]

    def batch_select_indices(self, indices) -> None:
        if self.is_initialized and self._kv is not None:
            self._set_kv((self._kv[0][indices, ...], self._kv[1][indices, ...]))

    def move_rows(self, src, dst, n: int) -> None:
        """Rows ``src`` to positions ``dst``, then keep the first ``n`` (``drop_rows``)."""
        if self.is_initialized and self._kv is not None:
            if len(src):
                for buf in self._kv:
                    buf[dst] = buf[src]
            self._set_kv((self._kv[0][:n], self._kv[1][:n]))

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError("ReservedLayer supports update, batch_select_indices and move_rows only (the decode loop's needs)")

    crop = reorder_cache = batch_repeat_interleave = _unsupported


@functools.cache
def reserved_layer_type() -> type:
    """``ReservedLayer``: a ``DynamicLayer`` with reserved room (built on first
    use, since transformers is imported only when a model runs)."""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(_ReservedRows, DynamicLayer):
        """A plain full-attention layer that appends into reserved room."""

    return ReservedLayer


def plain_layers(layers: Sequence[Any] | None) -> bool:
    """Whether every layer is a plain full-attention ``DynamicLayer``: only those
    hold every token, so only their KV can be kept, spliced and given room
    (sliding-window or linear-attention layers are left alone)."""
    from transformers.cache_utils import DynamicLayer

    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def reserved_cache(cache, room: int):
    """Swap the cache's plain layers for ``ReservedLayer``s with ``room`` spare
    columns; a cache with layers of other kinds is left as it is."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list) and plain_layers(layers):
        cache.layers = [reserved_layer_type()(room) for _ in layers]
    return cache


def load_heads(cache, heads: list[tuple[int, Any]]):
    """Write each row's cached head into the (empty) ``cache``: ``heads`` holds
    (n_cached, entry) per row, ``entry.kv`` having at least n_cached tokens
    (0: nothing cached). Heads are left-padded to the longest; returns the
    (rows, width) mask of their real columns, on the CPU."""
    import torch

    width = max(c for c, _ in heads)
    mask = torch.zeros((len(heads), width), dtype=torch.long)
    if not width:
        return mask
    ref = next(e for c, e in heads if c)
    for i in range(len(ref.kv)):
        cache.layers[i].update(_stacked_heads(heads, ref, i, 0, width), _stacked_heads(heads, ref, i, 1, width))
    for u, (c, _) in enumerate(heads):
        mask[u, width - c :] = 1
    return mask


def _stacked_heads(heads: list[tuple[int, Any]], ref, layer: int, kv: int, width: int):
    """Layer ``layer``'s keys (kv=0) or values (kv=1) of every head, left-padded with zeros."""
    r = ref.kv[layer][kv]
    out = r.new_zeros((len(heads), r.shape[0], width, r.shape[-1]))
    for u, (c, e) in enumerate(heads):
        if c:
            out[u, :, width - c :] = e.kv[layer][kv][:, :c]
    return out


def merge_prefills(prefilled: list, cache):
    """One decode cache from several prefills' (cache, mask, next_pos, logits):
    each left-padded to the longest (pads masked) and stacked along the batch,
    written into ``cache`` (empty, with reserved room)."""
    import torch
    import torch.nn.functional as F

    width = max(m.shape[1] for _, m, _, _ in prefilled)

    def stacked(i: int, attr: str):
        return torch.cat([F.pad(getattr(c.layers[i], attr), (0, 0, width - m.shape[1], 0)) for c, m, _, _ in prefilled])

    for i, layer in enumerate(cache.layers):
        layer.update(stacked(i, "keys"), stacked(i, "values"))
    mask = torch.cat([F.pad(m, (width - m.shape[1], 0)) for _, m, _, _ in prefilled])
    return cache, mask, torch.cat([p for _, _, p, _ in prefilled]), torch.cat([lg for _, _, _, lg in prefilled])


def drop_rows(cache, keep: list[int], device) -> list[int]:
    """Shrink the decode cache to the rows ``keep`` (batch positions); the new
    order as old positions.

    ``batch_select_indices`` copies every kept row (the whole KV buffer) each
    time a reply ends, a cost that bench/rollouts.py measures. Here the kept
    rows beyond the new size move into the holes the finished ones leave
    below it and the buffers are cut there: only moved rows are copied. The
    row order changes, which nothing depends on (rows are independent).
    """
    import torch

    n = len(keep)
    kept = set(keep)
    holes = [j for j in range(n) if j not in kept]
    movers = [j for j in keep if j >= n]
    perm = list(range(n))
    for hole, src in zip(holes, movers):
        perm[hole] = src
    layers = getattr(cache, "layers", None) or []
    if layers and all(hasattr(layer, "move_rows") for layer in layers):
        src, dst = torch.tensor(movers, dtype=torch.long, device=device), torch.tensor(holes, dtype=torch.long, device=device)
        for layer in layers:
            layer.move_rows(src, dst, n)
    else:
        cache.batch_select_indices(torch.tensor(perm, dtype=torch.long, device=device))
    return perm
