"""Prefill's transient memory: beyond weights and caches, one chunk holds a few activations per token, one block
of the MLP and at most MASK_ELEMENTS of attention mask, whatever the batch and context."""

import pytest
import torch
from bounds import assert_within, bound, model_terms
from reference import naive_forward, window_allowed

from bench.measure.memory import TensorTracker
from model import attention as A
from model import gpt
from model.config import Config
from model.generate import prefill_chunks
from model.gpt import GPT

pytestmark = pytest.mark.numeric  # checked with 1 and 2 threads (Makefile: test-threads)


def test_mlp_row_blocks_match_reference(monkeypatch):
    monkeypatch.setattr(gpt, "MLP_BLOCK_ROWS", 5)  # 2 x 13 rows: 5 full blocks and a partial one
    model = GPT.from_name("tiny")
    idx = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = naive_forward(model, idx, window_allowed(13))
        assert_within(model(idx), expected, bound(expected, model_terms(model.config, 13)))


def test_rope_matches_rotate_half():
    """apply_rope adds the sine terms in place; the reference builds rotate_half(x) = [-x2, x1] explicitly."""
    g = torch.Generator().manual_seed(0)
    x, cos, sin = torch.randn(2, 3, 5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    rotated = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
    expected = x * cos + rotated * sin
    assert_within(gpt.apply_rope(x, cos, sin), expected, bound(expected, 2))  # two products and a sum, rounded


@pytest.mark.parametrize("batch", [4, 8])
def test_chunk_transient_bytes_are_bounded(batch):
    """A 1024-token chunk at position 1024, bf16, a Llama-proportioned MLP (intermediate = 4 x n_embd). Analytic
    bound: (8 n_embd + qkv width) values per token (residual, its norm, q/k/v, roped q and k, attention output
    and its (B, T, C) copy, projection output, generously), 4 x intermediate values per row of one MLP block
    (gate/up output, silu, product) and the chunk's (T, S) mask, as bool plus SDPA's float copy. Before the MLP
    ran in blocks its temporaries alone were 4 x intermediate values for every token of the chunk."""
    cfg = Config.from_name("tiny", n_layer=1, intermediate_size=512)
    model = GPT(cfg).to(torch.bfloat16)
    T, S, e = 1024, 2048, 2
    model.set_kv_caches(batch, "dense", cache_length=S)
    ids = torch.randint(0, cfg.vocab_size, (batch, S), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids[:, :T], input_pos=0, skip_lm_head=True)
        with TensorTracker() as tracker:
            model(ids[:, T:], input_pos=T, skip_lm_head=True)
    N, C, inter = batch * T, cfg.n_embd, cfg.intermediate_size
    qkv = (cfg.n_head + 2 * cfg.n_query_groups) * cfg.head_size
    bound = N * e * (8 * C + qkv) + min(N, gpt.MLP_BLOCK_ROWS) * e * 4 * inter + min(T * S, A.MASK_ELEMENTS) * (1 + e)
    assert 0 < tracker.peak_dynamic <= bound, (tracker.peak_dynamic, bound)


def _prefill_peak(model: GPT, cache: str, length: int, ctx: int, chunk: int = 2048) -> tuple[int, int]:
    """(exact peak of live tensor bytes, cache bytes) of a chunked prefill of ctx tokens, batch 1."""
    model.set_kv_caches(1, cache, length)
    ids = torch.randint(0, model.config.vocab_size, (1, ctx), generator=torch.Generator().manual_seed(0))
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    tracker = TensorTracker(baseline=sum(t.numel() * t.element_size() for t in tensors.values()))
    with torch.inference_mode(), tracker:
        for start, end in prefill_chunks(model, ctx, chunk):  # none longer than the cache takes in one call
            model(ids[:, start:end], input_pos=start, skip_lm_head=True)
    cache_bytes = sum(c.size_estimate() for c in model.kv_caches)
    model.clear_kv_caches()
    return tracker.peak, cache_bytes


@pytest.fixture(scope="module")
def prefill_peaks():
    """ctx 16k, chunk 2048, tiny model: dense, and each eviction cache at a quarter of the context."""
    model = GPT.from_name("tiny").eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    ctx = 16384
    peaks = {"dense": _prefill_peak(model, "dense", ctx, ctx)}
    for cache in ("h2o", "tova", "snapkv", "qh2o", "last_recent"):
        peaks[cache] = _prefill_peak(model, cache, ctx // 4, ctx)
    return {name: (peak, peak - weights - cache_bytes) for name, (peak, cache_bytes) in peaks.items()}


@pytest.mark.parametrize("cache", ["h2o", "tova", "snapkv", "qh2o", "last_recent"])
def test_an_eviction_cache_lowers_the_prefill_peak(prefill_peaks, cache):
    """The scoring pass's query blocks are sized to a byte cap (model/attention.py, `block_rows`; last_recent's
    masked blocks likewise), so an eviction cache's transient (peak less weights and cache bytes) is at most dense's
    plus 10% at the same chunk, and its peak, holding a quarter of the bytes, is below dense's. Before the cap,
    h2o's transient here was 4.2x dense's, and its peak 2.5x dense's."""
    dense_peak, dense_transient = prefill_peaks["dense"]
    peak, transient = prefill_peaks[cache]
    assert transient <= 1.1 * dense_transient, (transient, dense_transient)
    assert peak < dense_peak, (peak, dense_peak)


def test_a_fixed_budget_keeps_the_peak_whatever_the_context():
    """cache.budget=1024 tokens: the peak at 16k is within 10% of the peak at 4k (the scoring transient does not grow
    with the context)."""
    model = GPT.from_name("tiny").eval()
    short, _ = _prefill_peak(model, "h2o", 1024, 4096)
    long, _ = _prefill_peak(model, "h2o", 1024, 16384)
    assert long <= 1.1 * short, (long, short)


@pytest.mark.parametrize("n_keys", [3072, 10240, 40960, 131072])
def test_a_scoring_block_never_outgrows_dense_s_mask(n_keys):
    """A chunk after the first, T = 2048 queries of 4 heads over n_keys (a buffer holding a fraction of the context,
    plus the chunk): one block's float32 scores take at most half the bytes of the largest mask a masked SDPA call
    builds (MASK_ELEMENTS booleans), however many keys, unless the floor of twice the queries' elements is larger."""
    T, n_head, hs = 2048, 4, 32
    query = torch.empty(1, n_head, T, hs)
    rows = A.block_rows(query, n_keys, q_start=T, most=256)
    score_bytes = 4 * n_head * rows * n_keys
    floor_rows = 2 * T * hs // n_keys
    assert score_bytes <= A.MASK_ELEMENTS // 2 or rows <= max(1, floor_rows), (rows, score_bytes)
