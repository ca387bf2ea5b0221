"""The methods papers compare against, beyond the policies of tests/test_eviction.py: Ada-KV's head-wise budget
against its naive reference, KIVI's buffer against a plain quantizer, and the bytes each holds against an analytic
count (PyramidKV's and Ada-KV's totals, KIVI's ratio to a 16-bit cache)."""

from fractions import Fraction

import pytest
import torch
from bounds import assert_within, attention_terms, bound, level
from naive_eviction import NaiveAdaKV

from caches import KVCacheParams, create_cache
from caches.allocation import layer_budgets
from caches.buffers import buffer_nbytes, make_buffer
from model.gpt import GPT

pytestmark = pytest.mark.numeric  # checked with 1 and 2 threads (Makefile: test-threads)

B, H, G, HS = 2, 4, 2, 32
CPU = torch.device("cpu")


def _qkv(T: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, n, T, HS, generator=gen) for n in (H, G, G))


@pytest.mark.parametrize(
    "scorer, knobs",
    [
        ("snapkv", {"window": 3, "kernel": 3}),
        ("snapkv", {"window": 2, "kernel": 5, "pooling": "avg", "alpha": 0.5}),
        ("h2o", {"recent": 2}),
    ],
)
@pytest.mark.parametrize("prefill", [5, 19])  # within the layer's total, and past it
def test_adakv_matches_its_naive_reference(scorer, knobs, prefill):
    """Every call: the same outputs, and every head keeps the same positions; the layer holds G x L tokens in all,
    shared unevenly between its heads once it evicts."""
    L = 6
    cache = create_cache("adakv", KVCacheParams(B, G, H, HS, L, CPU, torch.float32), scorer=scorer, **knobs)
    ref = NaiveAdaKV(L, B, G, H, scorer=scorer, **knobs)
    q, k, v = _qkv(prefill + 3 + 8, seed=11)
    calls = [(0, prefill), (prefill, prefill + 3)] + [(t, t + 1) for t in range(prefill + 3, prefill + 11)]
    for start, end in calls:
        args = (q[:, :, start:end], k[:, :, start:end], v[:, :, start:end])
        got = cache(*args, start)  # (B, T, H * hs)
        expected = ref.step(*args, start).transpose(1, 2).reshape(B, end - start, H * HS)
        assert_within(got, expected, bound(expected, attention_terms(HS, G * L + end - start), torch.float32))
        positions = cache.token_positions()
        for b in range(B):
            for g in range(G):
                assert [p for p in positions[b, g].tolist() if p >= 0] == ref.kept(b, g), (start, b, g)
    lengths = cache.head_lengths()
    assert (lengths.sum(dim=1) == G * L).all()


@pytest.mark.parametrize("scorer", ["snapkv", "h2o", "keydiff"])
def test_adakv_decode_step_on_a_full_layer_copies_no_kept_token(scorer, monkeypatch):
    """A full layer's decode step attends its flat buffer as it lies: no per-head gather (a copy of every kept token,
    each step), each head's token written to one of the layer's G spare slots, and the G that go leave their slots
    spare for the next step."""
    L = 6
    cache = create_cache("adakv", KVCacheParams(B, G, H, HS, L, CPU, torch.float32), scorer=scorer)
    q, k, v = _qkv(19 + 4, seed=3)
    cache(q[:, :, :19], k[:, :, :19], v[:, :, :19], 0)
    gathers = []
    monkeypatch.setattr(cache, "_gather", lambda b: gathers.append(b))
    for t in range(19, 23):
        cache(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], t)
        assert gathers == [] and ((cache.owner < 0).sum(dim=1) == G).all() and (cache.pos >= 0).sum() == B * G * L
    monkeypatch.undo()
    assert (cache.head_lengths().sum(dim=1) == G * L).all()


@pytest.mark.parametrize("scorer", ["knorm", "keydiff", "random"])
def test_adakv_wraps_any_headwise_policy_and_with_a_full_floor_is_that_policy(scorer):
    """alpha = 1: each head sets aside its own top cache_length, which fill the layer's total, so Ada-KV keeps per head
    what the wrapped cache keeps per head (both: the lowest score goes first, the older on a tie)."""
    L = 6
    params = KVCacheParams(B, G, H, HS, L, CPU, torch.float32)
    wrapped, plain = create_cache("adakv", params, scorer=scorer, alpha=1.0), create_cache(scorer, params)
    q, k, v = _qkv(19 + 8, seed=5)
    for start, end in [(0, 19)] + [(t, t + 1) for t in range(19, 27)]:
        args = (q[:, :, start:end], k[:, :, start:end], v[:, :, start:end])
        wrapped(*args, start), plain(*args, start)
        assert torch.equal(wrapped.token_positions(), plain.token_positions().sort(dim=-1).values), (scorer, start)


def test_adakv_refuses_a_policy_whose_scores_are_not_a_heads_own():
    with pytest.raises(ValueError, match="scorer='tova' is not valid; valid choices: h2o, keydiff, knorm, pyramidkv"):
        create_cache("adakv", KVCacheParams(B, G, H, HS, 6, CPU, torch.float32), scorer="tova")


def naive_kivi(x: torch.Tensor, bits: int, group: int, residual_from: int, per_channel: bool) -> torch.Tensor:
    """x (n, hs) as KIVI stores it: rows before `residual_from` quantized in groups of `group` rows per channel
    (keys) or per row in groups of `group` channels (values), min-max to 2**bits levels against the float16-rounded
    scale and zero (float32 arithmetic); the rows after as they are. Written element by element."""
    out = x.float().clone()
    levels = 2**bits - 1
    if per_channel:
        blocks = [(range(r, r + group), [c]) for r in range(0, residual_from, group) for c in range(x.shape[1])]
    else:
        blocks = [([r], range(c, c + group)) for r in range(residual_from) for c in range(0, x.shape[1], group)]
    for rows, cols in blocks:
        chunk = [float(x[r, c]) for r in rows for c in cols]
        lo, hi = min(chunk), max(chunk)
        scale = torch.tensor((hi - lo) / levels).half().float()
        zero = torch.tensor(lo).half().float()
        for r in rows:
            for c in cols:
                code = ((x[r, c].float() - zero) / scale.clamp_min(2**-24)).round().clamp(0, levels)
                out[r, c] = code * scale + zero
    return out


@pytest.mark.parametrize("buffer, bits", [("kivi2", 2), ("kivi4", 4)])
def test_kivi_stores_what_a_plain_quantizer_gives(tiny, buffer, bits):
    """A dense cache on a KIVI buffer after a prefill of 70 tokens and 10 decode steps: the first layer's keys, in
    its two full groups of 32 slots, quantized per channel, its values per token, the last 16 rows (the group being
    filled) exactly as they came; the model's K/V of that layer are the same with or without quantization."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 4096, (1, 80), generator=gen)

    def first_layer_kv(**buffer) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer's stored K/V (1, G, 80, hs) after the prefill and the decode steps."""
        tiny.set_kv_caches(1, "dense", 96, **buffer)
        with torch.inference_mode():
            tiny(ids[:, :70], input_pos=0)
            for t in range(70, 80):
                tiny(ids[:, t : t + 1], input_pos=t)
        return tiny.blocks[0].attn.kv_cache.buf.read(1, 80)

    k, v = first_layer_kv(buffer=buffer)
    fk, fv = first_layer_kv()  # full precision, the same calls: exactly the K/V the first layer was given
    for g in range(tiny.config.n_query_groups):
        for stored, given, per_channel in ((k, fk, True), (v, fv, False)):
            expected = naive_kivi(given[0, g], bits, 32, 64, per_channel=per_channel)
            assert_within(stored[0, g], expected, bound(expected, 2))  # code x scale + zero: two roundings
    assert (k[..., :64, :] - fk[..., :64, :]).abs().max() > level(fk, bits) / 4  # quantized: a fraction of a level
    assert torch.equal(k[..., 64:, :], fk[..., 64:, :])  # the residual as it came
    tiny.clear_kv_caches()


@pytest.mark.parametrize("buffer, most", [("kivi2", 0.2), ("kivi4", 0.33)])
def test_kivi_bytes_at_32k_against_a_16_bit_cache(buffer, most):
    """Llama-3.2-1B's KV heads and head size, ctx 32k, bf16: the buffer's bytes less its residual group, over a dense
    bf16 cache's."""
    params = KVCacheParams(1, 8, 32, 64, 32768, CPU, torch.bfloat16)
    dense = buffer_nbytes(params, "float")
    residual = 2 * 8 * 32 * 64 * 2  # K and V of one group of 32 slots per KV head, bf16
    ratio = Fraction(buffer_nbytes(params, buffer) - residual, dense)
    assert ratio <= most
    bits = int(buffer[-1])
    # per token and KV head: K and V codes, a key scale and zero (float16) per 32 tokens of each channel, a value
    # scale and zero per 32 channels of each token; over bf16 K and V
    per_token = Fraction(2 * 64 * bits, 8) + Fraction(2 * 2 * 64, 32) + 2 * 2 * 2
    assert ratio == per_token / (2 * 64 * 2)
    buf = make_buffer(KVCacheParams(1, 8, 32, 64, 96, CPU, torch.bfloat16), buffer)
    assert sum(b.numel() * b.element_size() for b in buf.buffers()) == buffer_nbytes(
        KVCacheParams(1, 8, 32, 64, 96, CPU, torch.bfloat16), buffer
    )


def test_pyramid_and_adakv_hold_exactly_their_total(tiny):
    """PyramidKV's layers share n_layer x budget slots (the first layers more); Ada-KV's layer holds G x budget in
    one flat buffer, whatever the heads' shares (PyramidKV's K/V buffer one slot more per layer, for its fused decode
    step; Ada-KV's G slots more per sequence, one per head's decoded token, and per head its free slot).
    Counted from the buffers and from the formulas."""
    counts = layer_budgets("pyramid", 400, 16, window=8)
    assert sum(counts) == 16 * 400 and counts == sorted(counts, reverse=True) and counts[0] > 2 * counts[-1]
    assert layer_budgets("pyramid", 100, 16, window=32) == [100] * 16  # the pyramid would pass below the window
    model = GPT.from_name("tiny", n_layer=4)
    model.set_kv_caches(2, "pyramidkv", 400, window=8)
    lengths = [c.cache_length for c in model.kv_caches]
    assert sum(lengths) == 4 * 400 and lengths[0] > lengths[-1]
    per_slot = 2 * model.config.head_size * 4 + 8 + 4  # K and V in float32, position, score
    fused = 2 * model.config.head_size * 4  # each layer's one K/V slot more, for its fused decode step
    total = 2 * model.config.n_query_groups * (1600 * per_slot + 4 * fused)
    assert sum(c.size_estimate() for c in model.kv_caches) == total
    model.set_kv_caches(2, "adakv", 400)
    cache = model.kv_caches[0]
    per_slot = 2 * model.config.head_size * 4 + 8 + 8 + 4  # K and V, owner, position, score
    G = model.config.n_query_groups
    assert (
        cache.size_estimate()
        == 2 * (G * 400 + G) * per_slot + 2 * G * 8
        == type(cache).size_estimate_apriori(cache.params)
    )
    assert sum(c.size_estimate() for c in model.kv_caches) == 4 * 2 * G * (400 * per_slot + per_slot + 8)


@pytest.mark.parametrize("cache", ["dense", "h2o"])
def test_a_kivi_buffer_is_refused_by_the_compiled_step_under_any_cache(cache):
    """KIVI's reads dequantize the whole buffer: the fixed-shape step says so (a row with a status, not a crash)."""
    from model.compiled_decode import UnsupportedBackend, plan

    model = GPT.from_name("tiny", n_layer=2)
    model.set_kv_caches(1, cache, 256, buffer="kivi2")
    with pytest.raises(UnsupportedBackend, match="kivi"):
        plan(model)
