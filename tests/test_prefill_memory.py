"""Prefill's transient memory: beyond weights and caches, one chunk holds a few activations per token, one block
of the MLP and at most MASK_ELEMENTS of attention mask, whatever the batch and context."""

import pytest
import torch
from reference import naive_forward, window_allowed

from bench.measure import TensorTracker
from model import attention as A
from model import gpt
from model.config import Config
from model.gpt import GPT


def test_mlp_row_blocks_match_reference(monkeypatch):
    monkeypatch.setattr(gpt, "MLP_BLOCK_ROWS", 5)  # 2 x 13 rows: 5 full blocks and a partial one
    model = GPT.from_name("tiny")
    idx = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), naive_forward(model, idx, window_allowed(13)), atol=1e-4, rtol=1e-4)


def test_rope_matches_rotate_half():
    """apply_rope adds the sine terms in place; the reference builds rotate_half(x) = [-x2, x1] explicitly."""
    g = torch.Generator().manual_seed(0)
    x, cos, sin = torch.randn(2, 3, 5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    rotated = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
    torch.testing.assert_close(gpt.apply_rope(x, cos, sin), x * cos + rotated * sin)


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
