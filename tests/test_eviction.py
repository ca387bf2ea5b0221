"""Every registered cache against the contract, the eviction policies against a naive reference, quantized
buffers against analytic byte counts and against dense on real weights."""

import pytest
import torch
from bounds import assert_within, attention_terms, bound, level, model_terms
from naive_eviction import NaiveScoredCache

from bench.eval.quality import corpus
from caches import KVCacheParams, cache_class, cache_names, create_cache, scored
from caches.buffers import make_buffer
from caches.scored import ScoredCache
from model.config import Config
from model.generate import generate
from model.gpt import RoPE

pytestmark = pytest.mark.numeric  # checked with 1 and 2 threads (Makefile: test-threads)

B, H, G, HS = 2, 4, 2, 32
CPU = torch.device("cpu")

CONFIGS = {  # name: (cache, kwargs)
    "dense": ("dense", {}),
    "dense-int8": ("dense", {"buffer": "int8"}),
    "dense-int4": ("dense", {"buffer": "int4", "group_size": 16}),
    "last_recent": ("last_recent", {"sink_tokens": 2}),
    "last_recent-int8": ("last_recent", {"buffer": "int8"}),
    "h2o": ("h2o", {}),
    "h2o-int4": ("h2o", {"buffer": "int4"}),
    "qh2o": ("qh2o", {}),
    "tova": ("tova", {}),
    "snapkv": ("snapkv", {"window": 3, "kernel": 3}),
    "knorm": ("knorm", {}),
    "random": ("random", {"seed": 3}),
    "keydiff": ("keydiff", {}),
    "expected_attention": ("expected_attention", {"n_future": 8, "n_sink": 2}),
    "pyramidkv": ("pyramidkv", {"window": 3, "kernel": 3}),
    "adakv": ("adakv", {"window": 3, "kernel": 3}),
    "adakv-h2o": ("adakv", {"scorer": "h2o"}),
    "dense-kivi2": ("dense", {"buffer": "kivi2"}),
    "last_recent-kivi4": ("last_recent", {"buffer": "kivi4", "sink_tokens": 2}),
}


def _params(L: int, dtype=torch.float32) -> KVCacheParams:
    return KVCacheParams(B, G, H, HS, L, CPU, dtype)


def _qkv(T: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, T, HS, generator=g),
        torch.randn(B, G, T, HS, generator=g),
        torch.randn(B, G, T, HS, generator=g),
    )


def test_every_registered_cache_is_covered():
    assert {name for name, _ in CONFIGS.values()} == set(cache_names())


@pytest.mark.parametrize("config", list(CONFIGS))
def test_contract(config):
    name, kwargs = CONFIGS[config]
    L = 24
    params = _params(L)
    cache = create_cache(name, params, **kwargs)
    cache.rotary = RoPE(Config.from_name("tiny")).forward  # what GPT.assign_kv_caches gives every cache
    assert cache.name == name and cache.next_token_pos is None and cache.cache_length == L
    assert cache.size_estimate() == sum(b.numel() * b.element_size() for b in cache.buffers())
    assert cache.size_estimate() == cache_class(name).size_estimate_apriori(params, **kwargs)
    q, k, v = _qkv(10, seed=1)
    out = cache(q[:, :, :6], k[:, :, :6], v[:, :, :6], 0)
    assert out.shape == (B, 6, H * HS) and cache.next_token_pos == 6
    cache(q[:, :, 6:9], k[:, :, 6:9], v[:, :, 6:9], 6)
    cache(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], 9)
    assert cache.next_token_pos == 10
    positions = cache.token_positions()
    assert positions.shape == (B, G, 10) and sorted(positions[1, 1].tolist()) == list(range(10))
    # store / retrieve: what was written reads back (exactly, or within the quantization step)
    stored_k, stored_v, held = cache.kept_kv(B)
    order = held.argsort(dim=-1).unsqueeze(-1).expand(-1, -1, -1, HS)
    buffer = kwargs.get("buffer", "int4" if name == "qh2o" else "float")
    tol = {"float": 0.0, "int8": 0.02, "int4": 0.35, "kivi2": 0.0, "kivi4": 0.0}[buffer]  # kivi: 10 residual rows
    assert (stored_k.gather(2, order) - k).abs().max() <= tol
    assert (stored_v.gather(2, order) - v).abs().max() <= tol
    cache(q[:, :, :4], k[:, :, :4], v[:, :, :4], 0)  # a prefill resets
    assert cache.next_token_pos == 4 and sorted(cache.token_positions()[0, 0].tolist()) == [0, 1, 2, 3]
    assert cache.size_estimate() == cache_class(name).size_estimate_apriori(params, **kwargs)


POLICIES = {  # name: (cache kwargs, reference kwargs)
    "h2o": ({}, {}),
    "h2o-recent1-normalized": ({"recent": 1, "normalize_scores": True}, {"recent": 1, "normalize": True}),
    "h2o-int8": ({"buffer": "int8"}, {"bits": 8}),
    "qh2o-int4": ({"alpha": 0.3, "recent": 2}, {"alpha": 0.3, "recent": 2, "bits": 4}),
    "qh2o-int8": ({"buffer": "int8"}, {"bits": 8}),
    "tova": ({}, {}),
    "snapkv-max": ({"window": 3, "kernel": 3}, {"window": 3, "kernel": 3}),
    "snapkv-avg": ({"window": 2, "kernel": 5, "pooling": "avg"}, {"window": 2, "kernel": 5, "pooling": "avg"}),
    "knorm": ({}, {}),
    "knorm-int8": ({"buffer": "int8"}, {"bits": 8}),
    "random": ({"seed": 3}, {"seed": 3}),
    "keydiff": ({}, {}),
    "keydiff-int4": ({"buffer": "int4"}, {"bits": 4}),
    "expected_attention": ({"n_future": 8, "n_sink": 2}, {"n_future": 8, "n_sink": 2}),
}


@pytest.mark.parametrize("block", [256, 3])  # query rows per eager block: 3 makes every prefill several blocks
@pytest.mark.parametrize("prefill", [5, 11])  # shorter and longer than the buffer
@pytest.mark.parametrize("policy", list(POLICIES))
def test_policy_matches_naive_reference(policy, prefill, block):
    name = policy.split("-")[0]
    kwargs, ref_kwargs = POLICIES[policy]
    L = 7
    cache = create_cache(name, _params(L), **kwargs)
    cache.attn_opts.block_size = block
    cache.rotary = RoPE(Config.from_name("tiny")).forward  # head size 32, base 10000: the reference's rotation
    ref = NaiveScoredCache(name, L, B, G, H, **ref_kwargs)
    q, k, v = _qkv(prefill + 3 + 6, seed=7)
    calls = [(0, prefill), (prefill, prefill + 3)] + [(t, t + 1) for t in range(prefill + 3, prefill + 9)]
    for start, end in calls:
        args = (q[:, :, start:end], k[:, :, start:end], v[:, :, start:end])
        got = cache(*args, start)  # (B, T, H * hs)
        expected = ref.step(*args, start).transpose(1, 2).reshape(B, end - start, H * HS)
        assert_within(got, expected, bound(expected, attention_terms(HS, L + end - start), torch.float32))
        for b in range(B):
            for g in range(G):
                assert sorted(cache.token_positions()[b, g].tolist()) == ref.kept(b, g), (start, b, g)


SCORED = [name for name in cache_names() if issubclass(cache_class(name), ScoredCache)]


@pytest.mark.parametrize("name", SCORED)
def test_a_decode_step_computes_attention_weights_only_where_its_policy_reads_them(name, monkeypatch):
    """knorm, keydiff and random score by keys, snapkv and expected_attention keep the tokens they generate: their
    decode step, eager and at fixed shapes (the compiled step's), computes no attention weights (one fused call over
    a slot more than they keep, counted in their bytes). h2o, qh2o and tova read the step's weights."""
    cls = cache_class(name)
    kwargs = CONFIGS[name][1]
    computed = []

    def spy(real):
        def call(*args, **kw):
            computed.append(real.__name__)
            return real(*args, **kw)

        return call

    for real in (scored.grouped_attention, scored.static_weighted_decode, scored.prompt_weights):
        monkeypatch.setattr(scored, real.__name__, spy(real))
    L, T = 8, 12
    cache = create_cache(name, _params(L), **kwargs)
    cache.rotary = RoPE(Config.from_name("tiny")).forward
    q, k, v = _qkv(T + 2, seed=2)
    cache(q[:, :, :T], k[:, :, :T], v[:, :, :T], 0)  # a prompt longer than the buffer
    computed.clear()
    cache(q[:, :, T : T + 1], k[:, :, T : T + 1], v[:, :, T : T + 1], T)  # an eager step
    cache.decode_step(q[:, :, T + 1 :], k[:, :, T + 1 :], v[:, :, T + 1 :], torch.tensor(T + 1))  # a fixed-shape one
    assert bool(computed) == cls.decode_weights, computed
    if name not in ("qh2o", "expected_attention"):  # a float buffer, no other state: K/V, int64 position, float32 score
        slots = L + (not cls.decode_weights)
        assert cache.size_estimate() == 2 * B * G * slots * HS * 4 + B * G * L * (8 + 4)


def test_decisions_are_per_sequence_and_head():
    """A heavy hitter planted in one (sequence, head) only is kept there and evicted elsewhere."""
    q, k, v = _qkv(16, seed=3)
    k[0, 1, 5] = q[0, 4:8, 5:].mean(dim=(0, 1)) * 8  # every later query of (b=0, g=1) attends to position 5
    cache = create_cache("h2o", _params(6), recent=2)
    cache(q[:, :, :10], k[:, :, :10], v[:, :, :10], 0)
    for t in range(10, 16):
        cache(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], t)
    kept = cache.token_positions()
    assert 5 in kept[0, 1].tolist()
    assert all(5 not in kept[b, g].tolist() for b, g in [(0, 0), (1, 0), (1, 1)])


def test_tova_decides_per_layer():
    """TOVA averages the last query's weights over all the layer's heads (Oren et al.): a token only one KV head
    attends to is kept, or dropped, in every head of its sequence, and the heads hold the same tokens."""
    q, k, v = _qkv(16, seed=3)
    k[0, 1, 5] = q[0, 4:8, 5:].mean(dim=(0, 1)) * 8  # the queries of (b=0, g=1) attend to position 5
    cache = create_cache("tova", _params(6))
    cache(q[:, :, :10], k[:, :, :10], v[:, :, :10], 0)
    for t in range(10, 16):
        cache(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], t)
        kept = cache.token_positions().sort(dim=-1).values  # (B, G, L)
        assert torch.equal(kept[:, 0], kept[:, 1]), t
    assert 5 in kept[0, 0].tolist()


@pytest.mark.parametrize(
    "config", [c for c in CONFIGS if c.split("-")[0] not in ("dense", "qh2o") and "int" not in c and "kivi" not in c]
)
def test_budget_covering_the_sequence_equals_dense(tiny, config):
    name, kwargs = CONFIGS[config]
    prompt = torch.randint(0, 4096, (2, 30), generator=torch.Generator().manual_seed(2))
    tiny.set_kv_caches(batch_size=2, cache="dense", cache_length=42)
    tiny.set_attention_backend("eager")
    dense = _logits(tiny, prompt)
    tiny.set_kv_caches(batch_size=2, cache=name, cache_length=42, **kwargs)
    assert_within(_logits(tiny, prompt), dense, bound(dense, model_terms(tiny.config, 42)))
    assert sorted(tiny.blocks[0].attn.kv_cache.token_positions()[1, 0].tolist()) == list(range(42))


def _logits(model, prompt):
    """Logits of a chunked prefill and 12 greedy decode steps."""
    out = []
    with torch.inference_mode():
        out.append(model(prompt[:, :20], input_pos=0))
        out.append(model(prompt[:, 20:], input_pos=20))
        token = out[-1][:, -1:].argmax(-1)
        for i in range(12):
            out.append(model(token, input_pos=30 + i))
            token = out[-1].argmax(-1)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("buffer,bits", [("int8", 8), ("int4", 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_buffer_bytes_are_analytic(buffer, bits, dtype):
    params = _params(100, dtype)
    buf = make_buffer(params, buffer, group_size=32)
    elems = 2 * B * G * 100 * HS  # K and V values
    payload = elems * bits // 8
    overhead = 2 * (elems // 32) * 2  # a float16 scale and zero point per group of 32
    assert sum(b.numel() * b.element_size() for b in buf.buffers()) == payload + overhead
    dense = elems * (4 if dtype == torch.float32 else 2)
    # vs a 16-bit dense cache: int8 = 0.5x, int4 = 0.25x, plus 1/16 for a scale and a zero per 32 values
    ratio_16bit = (payload + overhead) / (elems * 2)
    assert ratio_16bit == pytest.approx({8: 0.5, 4: 0.25}[bits] + 1 / 16)
    assert (payload + overhead) < dense


@pytest.mark.slow
@pytest.mark.parametrize("buffer", ["int8", "int4"])
def test_quantized_smollm2_logits_stay_close_to_dense(smollm2, buffer):
    """SmolLM2, 256 real tokens: a prefill of 192, then 63 tokens fed one by one, so that every step reads the
    quantized K/V of all earlier tokens. Each logit stays within sqrt(n_layer) levels of the quantizer over the
    logits' span (each layer's K and V up to half a level off, the layers' errors independent, so adding in
    quadrature); the mean KL(dense || quantized) then within half that bound squared (second order in the change).
    Top-1 agreement is asked only where the dense top-1 leads its runner-up by more than twice the bound: a position
    closer than that is a near-tie, which quantization may flip."""
    model, tok = smollm2
    ids = torch.tensor([corpus(tok)[:256]])  # Python's documentation text
    results = {}
    for buf in ("float", buffer):
        model.set_kv_caches(batch_size=1, cache="dense", cache_length=256, buffer=buf)
        with torch.inference_mode():
            logits = [model(ids[:, :192], input_pos=0)[:, -1:]]
            logits += [model(ids[:, i : i + 1], input_pos=i) for i in range(192, 255)]
        results[buf] = torch.cat(logits, dim=1).double()  # (1, 64, vocab)
    model.clear_kv_caches()
    dense, quant = results["float"], results[buffer]
    max_delta = model.config.n_layer**0.5 * level(dense, {"int8": 8, "int4": 4}[buffer])
    max_kl = max_delta**2 / 2
    log_p, log_q = dense.log_softmax(-1), quant.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert 0 < (quant - dense).abs().max().item() <= max_delta
    assert kl <= max_kl, kl
    top2 = dense.topk(2, dim=-1).values  # (1, 64, 2)
    decisive = (top2[..., 0] - top2[..., 1]) > 2 * max_delta  # (1, 64)
    assert bool(decisive.any()) or buffer == "int4"  # int8: some positions are checked (int4's bound leaves none)
    assert torch.equal(dense.argmax(-1)[decisive], quant.argmax(-1)[decisive])


def test_generate_runs_on_every_policy(tiny):
    prompt = torch.randint(0, 4096, (2, 40))
    for name in ("h2o", "qh2o", "tova", "snapkv"):
        tiny.set_kv_caches(batch_size=2, cache=name, cache_length=16)
        out = generate(tiny, prompt, max_new_tokens=6, prefill_chunk=8)
        assert out.shape == (2, 46)
        assert tiny.blocks[0].attn.kv_cache.token_positions().shape == (2, 2, 16)
