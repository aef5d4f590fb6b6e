"""In-process transformers backend: batched, seeded, with shared-prefix prefill.

Most of IPR's cost is generation (expert MC, exploration, agent MC, eval), so
this backend does what ``model.generate`` does not do for us:

- Shared prefixes (DESIGN.md): MC asks for N rollouts from the same state, i.e.
  N identical conversations in one call. ``generate(num_return_sequences=N)``
  would prefill that prompt N times; here each distinct prompt is prefilled
  once into a ``DynamicCache`` whose rows are then repeated
  (``batch_select_indices`` with repeated indices: ``batch_repeat_interleave``
  with a count per prompt). Going one step further, the head that all distinct
  prompts of a batch share (system prompt, often the task) is prefilled once
  as a single row before their tails.
- Across calls (``prefix_cache.py``): the KV of finished rows (prompt + reply)
  is kept, so the next turn of an episode prefills only what is new (the
  observation; the whole window once the history starts to slide). Uncached
  tails are prefilled in groups of similar length (``length_groups``) and
  merged into one decode cache.
- Per-request seeds: each row samples from its own ``torch.Generator`` (one
  uniform per token, inverse CDF), so a request's text depends on its
  conversation and seed, not on what else is in the batch.
- A manual decode loop that drops finished rows from the cache, so a batch's
  cost follows its live rows rather than its longest answer, and appends to
  reserved KV room instead of re-concatenating the cache every token.

Batch independence is exact in the sampling; the logits themselves can differ
in the last bits between batch shapes (GEMM blocking, padding). In fp32 that
practically never changes a token (CPU: every test equal; H100 fp32: 13/13
greedy, 12/13 sampled texts of a chaotic random 135M-shaped model). In bf16 it
does (same H100 check: 5/13 greedy equal across batch shapes), so on GPUs
"whatever the batch" holds only approximately; a fixed schedule (the runner's
is deterministic) still reproduces its results.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ipr_core.config import SamplingConfig
from ipr_core.policies.base import PolicyError, SamplingParams
from ipr_core.policies.prefix_cache import BLOCK, PrefixCache
from ipr_core.policies.segment_tokens import SegmentEncoder
from ipr_core.policies.tiny import IM_END, load_tokenizer
from ipr_core.types import Message

log = logging.getLogger(__name__)

# KV kept across calls: the config's default (sampling.prefix_cache_mb), one source for both.
DEFAULT_PREFIX_CACHE_MB: float = SamplingConfig.model_fields["prefix_cache_mb"].default

PREFILL_OVERHEAD_TOKENS = 64  # fixed cost of one more forward, in tokens of prefill compute (CPU, tiny model)
MIN_SHARED_HEAD = BLOCK  # tokens; below this a separate head prefill costs more than it saves


@dataclass
class GenerationStats:
    """Counters since construction (or ``reset_stats``), for benchmarks and logs."""

    calls: int = 0  # generate() calls
    requests: int = 0  # conversations answered
    prefills: int = 0  # prompts actually run through the model
    prefill_tokens: int = 0  # prompt tokens run through the model (padding excluded)
    cached_prefill_tokens: int = 0  # prompt tokens whose KV came from the prefix cache instead
    padded_prefill_tokens: int = 0  # the same including left padding
    generated_tokens: int = 0  # sampled tokens, stop tokens included
    prefill_forwards: int = 0  # model forwards over prompts (a batch's groups, a shared head)
    decode_steps: int = 0  # model forwards of one new token per live row
    decode_rows: int = 0  # live rows summed over decode steps (/ decode_steps: the mean decode batch)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def mean_decode_rows(self) -> float:
        """Live rows per decode step, on average (0 before any)."""
        return self.decode_rows / self.decode_steps if self.decode_steps else 0.0

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str = "auto", device: str = "cpu"):
    """auto: bfloat16 on a CUDA device that supports it, float32 otherwise."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16") from None


def load_model(path: str | Path, *, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) from a local checkpoint folder, in eval mode on ``device``.

    The tokenizer goes through ``tiny.load_tokenizer`` so locally trained BPEs
    reload as themselves (DESIGN.md tokenizer gotcha).
    """
    from ipr_core.policies.tiny import load_causal_lm

    dev = resolve_device(device)
    model = load_causal_lm(path, dtype=resolve_dtype(dtype, dev), trust_remote_code=trust_remote_code)
    model.to(dev).eval()
    return model, load_tokenizer(path, trust_remote_code=trust_remote_code)


def _stop_ids(tokenizer, model) -> frozenset[int]:
    """End of the assistant turn: <|im_end|> (ChatML) plus whatever eos the checkpoint declares."""
    ids: set[int] = set()
    vocab = tokenizer.get_vocab()
    if IM_END in vocab:
        ids.add(vocab[IM_END])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if not ids:
        raise ValueError("the tokenizer declares no eos token and has no <|im_end|>: cannot tell where a turn ends")
    return frozenset(ids)


class TransformersPolicy:
    """``Policy`` over a local transformers checkpoint.

    Not thread-safe: one ``generate`` at a time (the runner calls it from one thread).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        prefix_sharing: bool = True,
        prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB,
        trust_remote_code: bool = False,
    ):
        model, tokenizer = load_model(model_path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        self._setup(model, tokenizer, batch_size, prefix_sharing, prefix_cache_mb)

    @classmethod
    def from_model(cls, model, tokenizer, *, batch_size: int = 32, prefix_sharing: bool = True, prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB) -> "TransformersPolicy":
        """Wrap an already loaded model (e.g. evaluating during training)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, batch_size, prefix_sharing, prefix_cache_mb)
        return self

    def _setup(self, model, tokenizer, batch_size: int, prefix_sharing: bool, prefix_cache_mb: float) -> None:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefix_cache_mb < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0, got {prefix_cache_mb}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.prefix_sharing = prefix_sharing
        self.stats = GenerationStats()
        self.stop_ids = _stop_ids(tokenizer, model)
        self._encoder = SegmentEncoder(tokenizer)  # earlier turns' messages are not re-tokenized
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.stop_ids)
        params = inspect.signature(model.forward).parameters
        # transformers >= 5.2x names the KV cache argument ``cache``; earlier ``past_key_values``.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        # KV can be kept and spliced only for plain full-attention layers
        # (sliding-window or linear-attention layers do not hold every token).
        layers = getattr(DynamicCache(config=model.config), "layers", None)
        self._kv_reusable = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
        keep = self._kv_reusable and prefix_cache_mb > 0
        self._prefix = PrefixCache(int(prefix_cache_mb * 2**20)) if keep else None
        self._weights_version = sum(p._version for p in model.parameters())

    @property
    def device(self):
        return next(self.model.parameters()).device

    def reset_stats(self) -> None:
        self.stats = GenerationStats()

    def encode(self, conversation: Sequence[Message]) -> list[int]:
        """Prompt token ids: the chat template with the assistant turn opened."""
        text = self.tokenizer.apply_chat_template(list(conversation), add_generation_prompt=True, tokenize=False)
        return self._encoder.encode(text)

    def generate(self, conversations: Sequence[Sequence[Message]], sampling: SamplingParams, seeds: Sequence[int]) -> list[str]:
        if len(conversations) != len(seeds):
            raise ValueError(f"{len(conversations)} conversations but {len(seeds)} seeds")
        if sampling.temperature < 0 or not 0 < sampling.top_p <= 1:
            raise ValueError(f"invalid sampling {sampling}: temperature must be >= 0 and 0 < top_p <= 1")
        self.stats.calls += 1
        self.stats.requests += len(conversations)
        if not conversations:
            return []
        prompts = [self.encode(c) for c in conversations]
        out: list[str | None] = [None] * len(prompts)
        for chunk in self._chunks(prompts):
            for req, text in self._generate_chunk(chunk, sampling, seeds).items():
                out[req] = text
        assert all(t is not None for t in out)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.model = None  # drop the reference; the caller may free CUDA memory afterwards
        self.clear_prefix_cache()

    # --- batching --------------------------------------------------------------------

    def _chunks(self, prompts: list[list[int]]) -> list[list[tuple[list[int], list[int]]]]:
        """Batches of (prompt ids, request indices) with at most ``batch_size`` rows.

        Identical prompts form one unit (prefilled once) when prefix sharing is
        on. Units are ordered by length so each batch pads little.
        """
        units: dict[Any, tuple[list[int], list[int]]] = {}
        for i, ids in enumerate(prompts):
            key = tuple(ids) if self.prefix_sharing else i
            units.setdefault(key, (ids, []))[1].append(i)
        ordered = sorted(units.values(), key=lambda u: (-len(u[0]), u[1][0]))
        chunks: list[list[tuple[list[int], list[int]]]] = []
        cur: list[tuple[list[int], list[int]]] = []
        rows = 0
        for ids, reqs in ordered:
            # A unit bigger than a batch is split; each piece is prefilled once.
            for k in range(0, len(reqs), self.batch_size):
                piece = reqs[k : k + self.batch_size]
                if rows + len(piece) > self.batch_size:
                    chunks.append(cur)
                    cur, rows = [], 0
                cur.append((ids, piece))
                rows += len(piece)
        if cur:
            chunks.append(cur)
        return chunks

    @staticmethod
    def _shared_head(prompts: list[list[int]]) -> int:
        """Tokens at the start of every prompt, leaving each at least one of its
        own (its logits come from its tail). Worth a separate forward only when
        several prompts share a real head."""
        if len(prompts) < 2:
            return 0
        n = min(len(p) for p in prompts) - 1
        first = prompts[0]
        for p in prompts[1:]:
            k = 0
            while k < n and p[k] == first[k]:
                k += 1
            n = k
        return n if n >= MIN_SHARED_HEAD else 0

    def _forward(self, input_ids, attention_mask, position_ids, cache):
        kw = {self._cache_kw: cache, "use_cache": True}
        if self._keep_logits:
            kw["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
        return out.logits[:, -1, :].float()

    def _prefill(self, parts: list[tuple[list[int], int, Any]], room: int):
        """Run each part's uncached tail through the model on top of its cached head.

        ``parts``: (ids, n_cached, entry) per row, ``entry.kv`` holding at least
        ``n_cached`` tokens (n_cached = 0: nothing cached). Rows are laid out
        ``[pad | cached head | pad | tail]``: both segments left-padded, pads
        masked out, positions counting real tokens only (so padding does not
        shift RoPE), and the last column is every row's next-token position.
        Returns (cache, mask, next positions, last-column logits).
        """
        import torch
        from transformers import DynamicCache

        dev = self.device
        n = len(parts)
        cache = _reserved_cache(DynamicCache(config=self.model.config), room)
        width_c = max(c for _, c, _ in parts)
        cached_mask = torch.zeros((n, width_c), dtype=torch.long)
        if width_c:
            ref = next(e for _, c, e in parts if c)
            for i, (k0, v0) in enumerate(ref.kv):
                keys = k0.new_zeros((n, k0.shape[0], width_c, k0.shape[-1]))
                values = v0.new_zeros((n, v0.shape[0], width_c, v0.shape[-1]))
                for u, (_, c, e) in enumerate(parts):
                    if c:
                        keys[u, :, width_c - c :] = e.kv[i][0][:, :c]
                        values[u, :, width_c - c :] = e.kv[i][1][:, :c]
                cache.layers[i].update(keys, values)
            for u, (_, c, _) in enumerate(parts):
                cached_mask[u, width_c - c :] = 1
        tails = [ids[c:] for ids, c, _ in parts]
        width = max(len(t) for t in tails)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        tail_mask = torch.zeros((n, width), dtype=torch.long)
        for u, t in enumerate(tails):
            input_ids[u, width - len(t) :] = torch.tensor(t, dtype=torch.long)
            tail_mask[u, width - len(t) :] = 1
        input_ids, tail_mask = input_ids.to(dev), tail_mask.to(dev)
        mask = torch.cat([cached_mask.to(dev), tail_mask], dim=1)
        start = torch.tensor([c for _, c, _ in parts], dtype=torch.long, device=dev)
        pos = start[:, None] + (tail_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(input_ids, mask, pos, cache)
        self.stats.prefill_forwards += 1
        self.stats.prefill_tokens += sum(len(t) for t in tails)
        self.stats.padded_prefill_tokens += n * width
        self.stats.cached_prefill_tokens += sum(c for _, c, _ in parts)
        return cache, mask, pos[:, -1] + 1, logits

    @staticmethod
    def _store(store: PrefixCache | None, ids: list[int], cache, mask, row: int) -> None:
        """Keep row ``row``'s keys/values (its real columns: ``ids``) for later use."""
        if store is None:
            return
        cols = mask[row].nonzero().squeeze(-1)
        assert len(cols) == len(ids), (len(cols), len(ids))
        store.insert(ids, [(layer.keys[row].index_select(1, cols), layer.values[row].index_select(1, cols)) for layer in cache.layers])

    @staticmethod
    def _lookup(store: PrefixCache | None, ids: list[int], max_len: int) -> tuple[int, Any]:
        return (0, None) if store is None else store.lookup(ids, max_len)

    def _check_weights(self) -> None:
        """Cached KV belongs to the weights that computed it: an in-place update
        (an optimizer step on a model wrapped with ``from_model``) bumps the
        parameters' version counters and empties the cache."""
        version = sum(p._version for p in self.model.parameters())
        if version != self._weights_version:
            self._weights_version = version
            self.clear_prefix_cache()

    def clear_prefix_cache(self) -> None:
        """Forget the KV kept from earlier calls (benchmarks use it to time cold runs)."""
        if self._prefix is not None:
            self._prefix.clear()

    def _generate_chunk(self, units: list[tuple[list[int], list[int]]], sampling: SamplingParams, seeds: Sequence[int]) -> dict[int, str]:
        import torch
        from transformers import DynamicCache

        if self.model is None:
            raise PolicyError("generate() after close()")
        self._check_weights()
        dev = self.device
        t0 = time.perf_counter()
        room = sampling.max_new_tokens
        # pc: where prefixes are looked up (within the call when no cache is
        # kept across calls, budget 0); persist: where finished rows are kept.
        pc = persist = None
        if self.prefix_sharing and self._kv_reusable:
            pc = persist = self._prefix
            if pc is None:
                pc = PrefixCache(1 << 62)
        with torch.inference_mode(), _attention_backends(dev):
            prompts = [ids for ids, _ in units]
            # 1. What earlier calls computed: each prompt's longest cached prefix
            # (at least one token left, whose logits start the reply).
            hits = [self._lookup(pc, ids, len(ids) - 1) for ids in prompts]
            # 2. The head every distinct prompt shares (the system prompt, the
            # task...), where not cached yet: prefilled once as a single row and
            # stored, so every prompt then finds it.
            shared = self._shared_head(prompts) if pc is not None else 0
            if shared and min(c for c, _ in hits) < shared:
                head = prompts[0][:shared]
                c, e = self._lookup(pc, head, shared)
                if c < shared:
                    cache, mask, _, _ = self._prefill([(head, c, e)], 0)
                    self._store(pc, head, cache, mask, 0)
                hits = [self._lookup(pc, ids, len(ids) - 1) if hit[0] < shared else hit for ids, hit in zip(prompts, hits)]
            # 3. Every distinct prompt's uncached tail once, in groups of similar
            # length (one long tail would pad every row to its length), merged
            # into one cache for decoding.
            parts = [(ids, c, e) for ids, (c, e) in zip(prompts, hits)]
            groups = length_groups([len(ids) - c for ids, c, _ in parts])
            if len(groups) == 1:
                cache, mask, next_pos, logits = self._prefill(parts, room)
            else:
                order = [u for g in groups for u in g]
                units, prompts = [units[u] for u in order], [prompts[u] for u in order]
                empty = _reserved_cache(DynamicCache(config=self.model.config), room)
                cache, mask, next_pos, logits = _merge([self._prefill([parts[u] for u in g], 0) for g in groups], empty)
            self.stats.prefills += len(units)

            # Repeat each unit's cache row once per request that shares it.
            row_unit = [u for u, (_, reqs) in enumerate(units) for _ in reqs]
            row_req = [r for _, reqs in units for r in reqs]
            if len(row_unit) != len(units):
                idx = torch.tensor(row_unit, device=dev)
                cache.batch_select_indices(idx)
                mask, logits, next_pos = mask[idx], logits[idx], next_pos[idx]
            t1 = time.perf_counter()
            self.stats.prefill_s += t1 - t0

            # CPU generators: the same seed gives the same draws on any device.
            gens = [torch.Generator().manual_seed(int(seeds[r]) % (1 << 63)) for r in row_req] if sampling.temperature > 0 else None
            tokens: list[list[int]] = [[] for _ in row_req]
            fed = [0] * len(row_req)  # generated tokens whose KV is in the cache

            def store(rows: list[int]) -> None:  # batch positions of rows about to leave the cache
                if persist is None:  # nothing kept across calls: no row sequences to build
                    return
                for j in rows:
                    r = live[j]
                    self._store(persist, prompts[row_unit[r]] + tokens[r][: fed[r]], cache, mask, j)

            live = list(range(len(row_req)))  # batch position -> row
            for t in range(sampling.max_new_tokens):
                nxt = self._pick(logits, sampling, [gens[r] for r in live] if gens else None)
                self.stats.generated_tokens += len(live)
                keep = []
                for j, tok in enumerate(nxt.tolist()):
                    if tok in self.stop_ids:
                        continue
                    tokens[live[j]].append(tok)
                    keep.append(j)
                if not keep or t == sampling.max_new_tokens - 1:
                    break
                if len(keep) < len(live):
                    # Drop finished rows so later steps cost only live rows.
                    store(sorted(set(range(len(live))) - set(keep)))
                    perm = _drop_rows(cache, keep, dev)
                    kidx = torch.tensor(perm, device=dev)
                    mask, next_pos, nxt = mask[kidx], next_pos[kidx], nxt[kidx]
                    live = [live[j] for j in perm]
                mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
                logits = self._forward(nxt[:, None], mask, next_pos[:, None], cache)
                self.stats.decode_steps += 1
                self.stats.decode_rows += len(live)
                for r in live:
                    fed[r] += 1
                next_pos = next_pos + 1
            store(list(range(len(live))))
            self.stats.decode_s += time.perf_counter() - t1
        return {row_req[i]: self.tokenizer.decode(toks, skip_special_tokens=True) for i, toks in enumerate(tokens)}

    @staticmethod
    def _pick(logits, sampling: SamplingParams, gens):
        """Next token per row: argmax at temperature 0, else nucleus sampling by
        inverse CDF with one uniform from the row's own generator."""
        import torch

        if sampling.temperature == 0 or gens is None:
            return logits.argmax(-1)
        probs = torch.softmax(logits / sampling.temperature, dim=-1)
        order = None
        if sampling.top_p < 1.0:
            probs, order = probs.sort(dim=-1, descending=True, stable=True)
            # Keep the smallest head whose mass reaches top_p (the first token always).
            probs = probs.masked_fill(probs.cumsum(-1) - probs >= sampling.top_p, 0.0)
        cdf = probs.cumsum(-1)
        u = torch.tensor([torch.rand(1, generator=g).item() for g in gens], dtype=cdf.dtype, device=cdf.device)
        # right=True skips flat (zero-probability) stretches of the CDF.
        idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
        return (order.gather(-1, idx) if order is not None else idx).squeeze(-1)


def length_groups(lengths: Sequence[int], overhead: int | None = None, max_groups: int = 4) -> list[list[int]]:
    """Split row indices into groups of similar length for separate prefills.

    A batched forward pads every row to the longest; a separate forward costs
    a fixed overhead (about ``overhead`` tokens' worth of compute). Minimises
    sum(rows x longest) + overhead per group over contiguous runs of the
    rows sorted by length (a small dynamic programme; n <= batch size).
    Groups come out shortest first; an empty input gives no group.
    """
    if not lengths:
        return []
    overhead = PREFILL_OVERHEAD_TOKENS if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    inf = float("inf")
    # best[k][j]: cost of the first j sorted rows in k groups; cut[k][j]: start of the last group
    best = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for k in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                c = best[k - 1][i] + (j - i) * lengths[order[j - 1]] + overhead
                if c < best[k][j]:
                    best[k][j], cut[k][j] = c, i
    k = min(range(1, max_groups + 1), key=lambda k: best[k][n])
    groups, j = [], n
    while k:
        i = cut[k][j]
        groups.append(order[i:j])
        j, k = i, k - 1
    return groups[::-1]


def _merge(prefilled: list, cache):
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


def _drop_rows(cache, keep: list[int], device) -> list[int]:
    """Shrink the decode cache to the rows ``keep`` (batch positions); the new
    order as old positions.

    ``batch_select_indices`` copies every kept row (the whole KV buffer) each
    time a reply ends: ~0.3 s of a benchmark run. Here the kept
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


def _attention_backends(device):
    """Keep SDPA off cuDNN attention on CUDA.

    cuDNN builds an execution plan per new shape, and decoding makes a new
    shape (KV length) at every step: measured on an H100, 93-152 ms per decode
    step cold vs 4-7 ms with the plans cached. Flash / memory-efficient
    attention need no plans.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to steer
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _reserved_cache(cache, room: int):
    """Swap the cache's plain layers for ones that append into reserved room.

    ``DynamicLayer.update`` concatenates the whole cache for every new token:
    O(length) copying per step, a quarter of CPU decode time here. Reserving
    ``room`` slots at prefill makes each decode step a slice write. Layers of
    other kinds (sliding window, linear attention) are left as they are.
    """
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self._n = 0
                self._kv = None
            n = self._n + key_states.shape[-2]
            if self._kv is None or n > self._kv[0].shape[-2]:
                grown = []
                for old, new in zip(self._kv or (None, None), (key_states, value_states)):
                    buf = new.new_empty(*new.shape[:-2], n + room, new.shape[-1])
                    if old is not None:
                        buf[..., : self._n, :] = old[..., : self._n, :]
                    grown.append(buf)
                self._kv = tuple(grown)
            self._kv[0][..., self._n : n, :] = key_states
            self._kv[1][..., self._n : n, :] = value_states
            self._n = n
            self._set_kv(self._kv)
            return self.keys, self.values

        def _set_kv(self, kv) -> None:
            """New buffers; ``keys``/``values`` are their first ``_n`` columns."""
            self._kv = kv
            self.keys, self.values = kv[0][..., : self._n, :], kv[1][..., : self._n, :]

        def batch_select_indices(self, indices) -> None:
            if self.is_initialized and self._kv is not None:
                self._set_kv((self._kv[0][indices, ...], self._kv[1][indices, ...]))

        def move_rows(self, src, dst, n: int) -> None:
            """Rows ``src`` to positions ``dst``, then keep the first ``n`` (``_drop_rows``)."""
            if self.is_initialized and self._kv is not None:
                if len(src):
                    for buf in self._kv:
                        buf[dst] = buf[src]
                self._set_kv((self._kv[0][:n], self._kv[1][:n]))

        def _unsupported(self, *args, **kwargs):
            raise NotImplementedError("ReservedLayer supports update, batch_select_indices and move_rows only (the decode loop's needs)")

        crop = reorder_cache = batch_repeat_interleave = _unsupported

    layers = getattr(cache, "layers", None)
    if isinstance(layers, list) and layers and all(type(layer) is DynamicLayer for layer in layers):
        cache.layers = [ReservedLayer() for _ in layers]
    return cache
