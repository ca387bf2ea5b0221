"""A compressed cache read as it is, and new tokens appended after it without eviction: how one compressed context
answers several questions (the `agnostic` protocol of bench/eval/protocols.py, as NVIDIA's kvpress evaluates a press).

    base = model.kv_caches                                         # after a prefill of the context alone
    model.assign_kv_caches([FrozenPrefixCache(c, 64) for c in base])
    model(question, input_pos=context_length)                      # attends base's kept tokens and itself
    ...                                                            # the next question: new FrozenPrefixCache objects

The base cache is never written: its kept tokens are the same before every question. Not registered: it wraps a
cache, it is not one of the strategies a sweep compares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caches.base import KVCache, KVCacheParams
from caches.buffers import buffer_nbytes, make_buffer
from model.attention import Visibility, grouped_attention


class FrozenPrefixCache(KVCache):
    name = "frozen_prefix"

    def __init__(self, base: KVCache, slots: int) -> None:
        p = base.params
        super().__init__(KVCacheParams(p.batch_size, p.n_query_groups, p.n_head, p.head_size, slots, p.device, p.dtype))
        if base.next_token_pos is None:
            raise ValueError("the base cache is empty: prefill it first")
        self.base = base
        self.buf = make_buffer(self.params)  # the appended tokens, at full precision
        self.start = self.next_token_pos = base.next_token_pos
        # a cache whose heads keep different numbers of tokens (adakv) reads back padded (position -1): masked. The
        # base is frozen, so this is decided once
        self.padded = bool((base.token_positions() < 0).any())
        self.batch_size = base.batch_size
        self.attn_opts = base.attn_opts

    def _prefill(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        raise ValueError("a frozen prefix takes no new prefill: wrap a freshly prefilled cache instead")

    def _extend(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        B, _, T, _ = key.shape
        offset, end = input_pos - self.start, input_pos - self.start + T
        self.buf.write_range(B, offset, key, value)
        old_k, old_v, positions = self.base.kept_kv(B)  # (B, G, n, hs), positions (B, G, n)
        new_k, new_v = self.buf.read(B, end)  # (B, G, end, hs)
        new_pos = torch.arange(self.start, self.start + end, device=key.device)
        segments = [
            (old_k, old_v, Visibility(q_start=input_pos, k_pos=positions, all_visible=not self.padded)),
            (new_k, new_v, Visibility(q_start=input_pos, k_pos=new_pos, k_start=self.start)),
        ]
        out, _ = grouped_attention(query, segments, self.attn_opts)
        return out

    def token_positions(self) -> Tensor:
        n = (self.next_token_pos or self.start) - self.start
        new = torch.arange(self.start, self.start + n, device=self.params.device)
        base = self.base.token_positions()
        return torch.cat([base, new.expand(*base.shape[:2], n)], dim=-1)

    @classmethod
    def size_estimate_apriori(cls, params: KVCacheParams, **kwargs) -> int:
        return buffer_nbytes(params)
