import pytest
import torch
from bounds import assert_within, bound, model_terms
from reference import naive_forward, window_allowed
from test_attention import _Spy

from caches import KVCacheParams, cache_names, create_cache
from caches.dense import DenseCache
from caches.last_recent import LastRecentCache
from model.gpt import GPT

pytestmark = pytest.mark.numeric  # checked with 1 and 2 threads (Makefile: test-threads)

VOCAB = 4096


def _ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _run(model: GPT, idx: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Logits of every position, fed in calls of the given lengths (the rest one token at a time)."""
    outs, pos = [], 0
    with torch.inference_mode():
        for n in splits:
            outs.append(model(idx[:, pos : pos + n], input_pos=pos))
            pos += n
        while pos < idx.shape[1]:
            outs.append(model(idx[:, pos : pos + 1], input_pos=pos))
            pos += 1
    return torch.cat(outs, dim=1)


def test_registry_lists_names_on_unknown():
    params = KVCacheParams(1, 2, 4, 32, 16, torch.device("cpu"), torch.float32)
    assert {"dense", "last_recent"} <= set(cache_names())
    with pytest.raises(ValueError, match="unknown cache 'lru'; valid names: .*dense.*last_recent"):
        create_cache("lru", params)


def test_dense_chunked_prefill_and_decode_equal_uncached_forward(tiny):
    idx = _ids(2, 48)
    with torch.inference_mode():
        expected = tiny(idx)
    tiny.set_kv_caches(batch_size=2, cache="dense", cache_length=64)
    got = _run(tiny, idx, [16, 10, 7])
    assert_within(got, expected, bound(expected, model_terms(tiny.config, 48)))


def test_last_recent_with_room_equals_dense_exactly(tiny):
    idx = _ids(2, 40)
    tiny.set_kv_caches(batch_size=2, cache="dense", cache_length=40)
    dense = _run(tiny, idx, [16, 8])
    tiny.set_kv_caches(batch_size=2, cache="last_recent", cache_length=40, sink_tokens=4)
    assert torch.equal(_run(tiny, idx, [16, 8]), dense)


def window_bound(expected: torch.Tensor, model, keys: int) -> float:
    """The cache against the naive forward, each through its own sums over `keys` keys at most."""
    return bound(expected, model_terms(model.config, keys))


@pytest.mark.parametrize("sinks", [0, 3])
@pytest.mark.parametrize("splits", [[24], [40], [8, 9, 10], [50], [6, 16, 5]])
def test_last_recent_equals_sliding_window_reference(tiny, sinks, splits):
    """Prefills and chunks shorter and longer than the 16-slot buffer, then decode past several wraps."""
    L, T = 16, 60
    idx = _ids(2, T, seed=1)
    with torch.inference_mode():
        expected = naive_forward(tiny, idx, window_allowed(T, window=L - sinks, sinks=sinks))
    tiny.set_kv_caches(batch_size=2, cache="last_recent", cache_length=L, sink_tokens=sinks)
    LastRecentCache.query_block = 7  # several masked blocks per long chunk
    try:
        got = _run(tiny, idx, splits)
    finally:
        LastRecentCache.query_block = 1024
    assert_within(got, expected, window_bound(expected, tiny, L))
    cache = tiny.blocks[0].attn.kv_cache
    positions = sorted(cache.token_positions()[0, 0].tolist())
    assert positions == list(range(sinks)) + list(range(T - (L - sinks), T))


def test_sliding_window_reference_differs_from_dense(tiny):
    """Guard: the window comparison above would be vacuous if eviction did not change the logits."""
    idx = _ids(1, 40, seed=1)
    with torch.inference_mode():
        full = naive_forward(tiny, idx, window_allowed(40))
        windowed = naive_forward(tiny, idx, window_allowed(40, window=16))
    assert (full[:, -1] - windowed[:, -1]).abs().max() > window_bound(full, tiny, 16)  # beyond what it allows
    assert torch.equal(full[:, :16], windowed[:, :16])  # the same masks there: the same computation


@pytest.mark.parametrize("cls,kwargs", [(DenseCache, {}), (LastRecentCache, {"sink_tokens": 2})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_size_estimate_equals_buffer_bytes_and_apriori(cls, kwargs, dtype):
    params = KVCacheParams(3, 2, 4, 32, 20, torch.device("cpu"), dtype)
    cache = cls(params, **kwargs)
    itemsize = 4 if dtype == torch.float32 else 2
    kv = 2 * 3 * 2 * 20 * 32 * itemsize  # K and V: batch * groups * slots * head_size
    expected = kv + (20 * 8 if cls is LastRecentCache else 0)  # + int64 slot positions
    assert cache.size_estimate() == expected == cls.size_estimate_apriori(params, **kwargs)
    assert cache.size_estimate() == sum(b.numel() * b.element_size() for b in cache.buffers())


def test_token_positions_after_prefill_and_decode(tiny):
    tiny.set_kv_caches(batch_size=2, cache="dense", cache_length=32)
    _run(tiny, _ids(2, 12), [10])
    pos = tiny.blocks[1].attn.kv_cache.token_positions()
    assert pos.shape == (2, 2, 12) and pos[1, 1].tolist() == list(range(12))
    assert tiny.blocks[1].attn.kv_cache.next_token_pos == 12


def test_prefill_resets(tiny):
    tiny.set_kv_caches(batch_size=1, cache="last_recent", cache_length=8)
    idx = _ids(1, 20)
    _run(tiny, idx, [20])
    first = _run(tiny, idx[:, :5], [5])  # a new prefill forgets the 20 tokens
    tiny.set_kv_caches(batch_size=1, cache="last_recent", cache_length=8)
    assert torch.equal(first, _run(tiny, idx[:, :5], [5]))
    assert tiny.blocks[0].attn.kv_cache.token_positions()[0, 0].tolist() == list(range(5))


def test_bad_inputs_are_clear_errors(tiny):
    tiny.set_kv_caches(batch_size=2, cache="dense", cache_length=16)
    with torch.inference_mode():
        with pytest.raises(ValueError, match="empty: start with a prefill"):
            tiny(_ids(2, 1), input_pos=3)
        tiny(_ids(2, 8), input_pos=0)
        with pytest.raises(ValueError, match="input_pos=5 but the cache expects next_token_pos=8"):
            tiny(_ids(2, 1), input_pos=5)
        with pytest.raises(ValueError, match="batch size 3 exceeds the cache's maximum batch_size=2"):
            tiny(_ids(3, 4), input_pos=0)
        with pytest.raises(ValueError, match="prefill of 17 tokens exceeds dense cache's max_prefill_length=16"):
            tiny(_ids(2, 17), input_pos=0)
        tiny(_ids(2, 8), input_pos=0)
        with pytest.raises(ValueError, match="dense cache is full: 17 tokens do not fit in cache_length=16"):
            tiny(_ids(2, 9), input_pos=8)
        with pytest.raises(ValueError, match="differs from the prefill's batch size 2"):
            tiny(_ids(1, 1), input_pos=8)
    tiny.clear_kv_caches()
    with pytest.raises(ValueError, match="no KV caches are assigned"):
        tiny(_ids(1, 4), input_pos=0)
    with pytest.raises(ValueError, match="unknown cache 'h2x'"):
        tiny.set_kv_caches(batch_size=1, cache="h2x")


def test_causal_prefill_allocates_no_square_mask(tiny):
    T = 200
    tiny.set_kv_caches(batch_size=1, cache="dense", cache_length=256)
    tiny.set_attention_backend("flash")
    with _Spy() as spy, torch.inference_mode():
        tiny(_ids(1, T), input_pos=0, skip_lm_head=True)
        tiny(_ids(1, 3), input_pos=T, skip_lm_head=True)  # a chunk builds only its (3, 203) slice
    square = [c for c in spy.calls if any(len(s) >= 2 and s[-2:] == (T, T) for s in c[1])]
    assert not square, square
    assert any(s[-2:] == (3, T + 3) for c in spy.calls for s in c[1] if len(s) >= 2)  # the chunk's mask, seen
