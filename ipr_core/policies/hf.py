"""In-process transformers backend: batched, seeded, with shared-prefix prefill.

Most of IPR's cost is generation (expert MC, exploration, agent MC, eval), so
this backend does what ``model.generate`` does not do for us:

- Shared prefixes (docs/models.md, prefix-cache notes): MC asks for N rollouts from the same state, i.e.
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
  reserved KV room instead of re-concatenating the cache every token (the
  KV buffers are managed in ``kv_cache.py``).

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
from ipr_core.policies.kv_cache import drop_rows, load_heads, merge_prefills, plain_layers, reserved_cache
from ipr_core.policies.prefix_cache import BLOCK, PrefixCache, process_budget
from ipr_core.policies.segment_tokens import SegmentEncoder
from ipr_core.policies.tiny import IM_END, load_tokenizer
from ipr_core.types import Message

log = logging.getLogger(__name__)

# KV kept across calls: the config's default (sampling.prefix_cache_mb), one source for both.
DEFAULT_PREFIX_CACHE_MB: float = SamplingConfig.model_fields["prefix_cache_mb"].default

PREFILL_OVERHEAD_TOKENS = 64  # fixed cost of one more forward, in tokens of prefill compute (CPU, tiny model)
MIN_SHARED_HEAD = BLOCK  # tokens; below this a separate head prefill costs more than it saves

# The KV helpers' former names, now in kv_cache.py.
_reserved_cache, _drop_rows, _merge = reserved_cache, drop_rows, merge_prefills


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
    reload as themselves (docs/models.md, tokenizer gotchas).
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


@dataclass
class _DecodeBatch:
    """A chunk after prefill: one row per request, updated by the decode loop."""

    cache: Any  # the decode KV cache (rows in batch-position order)
    mask: Any  # (positions, columns): 1 for real tokens, 0 for pads
    next_pos: Any  # per position: the position id of its next token
    logits: Any  # per position: the logits of its next token
    prompts: list[list[int]]  # per unit: its prompt ids
    row_unit: list[int]  # per row: its unit
    row_req: list[int]  # per row: its request


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
        self._kv_reusable = plain_layers(getattr(DynamicCache(config=model.config), "layers", None))
        keep = self._kv_reusable and prefix_cache_mb > 0
        # The budget is the process's: policies built side by side (concurrent stages) share it.
        self._prefix = PrefixCache(process_budget(int(prefix_cache_mb * 2**20))) if keep else None
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
        cache = reserved_cache(DynamicCache(config=self.model.config), room)
        cached_mask = load_heads(cache, [(c, e) for _, c, e in parts])
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

    # --- one chunk: prefill, then decode --------------------------------------------

    def _generate_chunk(self, units: list[tuple[list[int], list[int]]], sampling: SamplingParams, seeds: Sequence[int]) -> dict[int, str]:
        import torch

        if self.model is None:
            raise PolicyError("generate() after close()")
        self._check_weights()
        t0 = time.perf_counter()
        lookup, persist = self._prefix_stores()
        with torch.inference_mode(), _attention_backends(self.device):
            batch = self._prefill_chunk(units, lookup, sampling.max_new_tokens)
            t1 = time.perf_counter()
            self.stats.prefill_s += t1 - t0
            tokens = self._decode(batch, sampling, seeds, persist)
            self.stats.decode_s += time.perf_counter() - t1
        return {req: self.tokenizer.decode(toks, skip_special_tokens=True) for req, toks in zip(batch.row_req, tokens)}

    def _prefix_stores(self) -> tuple[PrefixCache | None, PrefixCache | None]:
        """(lookup, persist): where prefixes are looked up and where finished rows are kept.

        With no cache kept across calls (budget 0) the lookup store lives for
        this call only, so identical heads within a batch are still shared.
        """
        if not (self.prefix_sharing and self._kv_reusable):
            return None, None
        persist = self._prefix
        return (PrefixCache(1 << 62) if persist is None else persist), persist

    # --- prefill ---

    def _prefill_chunk(self, units: list[tuple[list[int], list[int]]], lookup: PrefixCache | None, room: int) -> _DecodeBatch:
        """Every distinct prompt's uncached tail run through the model, then each
        unit's row repeated once per request that shares it."""
        prompts = [ids for ids, _ in units]
        hits = self._cached_heads(lookup, prompts)
        order, prefilled = self._prefill_tails([(ids, c, e) for ids, (c, e) in zip(prompts, hits)], room)
        units, prompts = [units[u] for u in order], [prompts[u] for u in order]
        self.stats.prefills += len(units)
        return self._repeat_rows(units, prompts, *prefilled)

    def _cached_heads(self, lookup: PrefixCache | None, prompts: list[list[int]]) -> list[tuple[int, Any]]:
        """(n_cached, entry) per prompt: its longest cached prefix, leaving at
        least one token, whose logits start the reply."""
        hits = [self._lookup(lookup, ids, len(ids) - 1) for ids in prompts]
        # The head every distinct prompt shares (the system prompt, the task...),
        # where not cached yet: prefilled once as a single row and stored, so
        # every prompt then finds it.
        shared = self._shared_head(prompts) if lookup is not None else 0
        if not shared or min(c for c, _ in hits) >= shared:
            return hits
        head = prompts[0][:shared]
        c, e = self._lookup(lookup, head, shared)
        if c < shared:
            cache, mask, _, _ = self._prefill([(head, c, e)], 0)
            self._store(lookup, head, cache, mask, 0)
        return [self._lookup(lookup, ids, len(ids) - 1) if hit[0] < shared else hit for ids, hit in zip(prompts, hits)]

    def _prefill_tails(self, parts: list[tuple[list[int], int, Any]], room: int) -> tuple[list[int], tuple]:
        """(row order, (cache, mask, next_pos, logits)) of the parts' tails prefilled
        in groups of similar length and merged into one decode cache."""
        from transformers import DynamicCache

        # One long tail would pad every row of a single forward to its length.
        groups = length_groups([len(ids) - c for ids, c, _ in parts])
        if len(groups) == 1:
            return list(range(len(parts))), self._prefill(parts, room)
        order = [u for g in groups for u in g]
        empty = reserved_cache(DynamicCache(config=self.model.config), room)
        return order, merge_prefills([self._prefill([parts[u] for u in g], 0) for g in groups], empty)

    def _repeat_rows(self, units: list[tuple[list[int], list[int]]], prompts: list[list[int]], cache, mask, next_pos, logits) -> _DecodeBatch:
        import torch

        row_unit = [u for u, (_, reqs) in enumerate(units) for _ in reqs]
        row_req = [r for _, reqs in units for r in reqs]
        if len(row_unit) != len(units):
            idx = torch.tensor(row_unit, device=self.device)
            cache.batch_select_indices(idx)
            mask, logits, next_pos = mask[idx], logits[idx], next_pos[idx]
        return _DecodeBatch(cache, mask, next_pos, logits, prompts, row_unit, row_req)

    # --- decode ---

    def _decode(self, batch: _DecodeBatch, sampling: SamplingParams, seeds: Sequence[int], persist: PrefixCache | None) -> list[list[int]]:
        """Sample every row's reply token by token; the tokens per row (stop token excluded)."""
        import torch

        # CPU generators: the same seed gives the same draws on any device.
        gens = [torch.Generator().manual_seed(int(seeds[r]) % (1 << 63)) for r in batch.row_req] if sampling.temperature > 0 else None
        tokens: list[list[int]] = [[] for _ in batch.row_req]
        fed = [0] * len(batch.row_req)  # generated tokens whose KV is in the cache
        live = list(range(len(batch.row_req)))  # batch position -> row

        def store(positions: list[int]) -> None:  # batch positions of rows about to leave the cache
            if persist is None:  # nothing kept across calls: no row sequences to build
                return
            for j in positions:
                r = live[j]
                self._store(persist, batch.prompts[batch.row_unit[r]] + tokens[r][: fed[r]], batch.cache, batch.mask, j)

        for t in range(sampling.max_new_tokens):
            nxt = self._pick(batch.logits, sampling, [gens[r] for r in live] if gens else None)
            self.stats.generated_tokens += len(live)
            keep = self._append_tokens(nxt.tolist(), live, tokens)
            if not keep or t == sampling.max_new_tokens - 1:
                break
            if len(keep) < len(live):
                # Drop finished rows so later steps cost only live rows.
                store(sorted(set(range(len(live))) - set(keep)))
                nxt, live = self._drop_finished(batch, keep, nxt, live)
            self._decode_step(batch, nxt)
            for r in live:
                fed[r] += 1
        store(list(range(len(live))))
        return tokens

    def _append_tokens(self, picked: list[int], live: list[int], tokens: list[list[int]]) -> list[int]:
        """Append each live row's token; the batch positions still generating."""
        keep = []
        for j, tok in enumerate(picked):
            if tok in self.stop_ids:
                continue
            tokens[live[j]].append(tok)
            keep.append(j)
        return keep

    def _drop_finished(self, batch: _DecodeBatch, keep: list[int], nxt, live: list[int]):
        """Shrink the batch to the positions ``keep``; (their next tokens, their rows)."""
        import torch

        perm = drop_rows(batch.cache, keep, self.device)
        kidx = torch.tensor(perm, device=self.device)
        batch.mask, batch.next_pos = batch.mask[kidx], batch.next_pos[kidx]
        return nxt[kidx], [live[j] for j in perm]

    def _decode_step(self, batch: _DecodeBatch, nxt) -> None:
        """Feed each live row its new token: the next logits, one more column."""
        import torch

        rows = len(nxt)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((rows, 1))], dim=1)
        batch.logits = self._forward(nxt[:, None], batch.mask, batch.next_pos[:, None], batch.cache)
        self.stats.decode_steps += 1
        self.stats.decode_rows += rows
        batch.next_pos = batch.next_pos + 1

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


def _attention_backends(device):
    """Keep SDPA off cuDNN attention on CUDA.

    cuDNN builds an execution plan per new shape, and decoding makes a new
    shape (KV length) at every step: a cold decode step then costs many times
    a cached one (measured by bench/rollouts.py on a GPU). Flash /
    memory-efficient attention need no plans.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # older torch: nothing to steer
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
