"""A compressed cache read as it is, and new tokens appended after it without eviction: how one compressed context
answers several questions (the `agnostic` protocol of bench/eval/protocols.py, as NVIDIA's kvpress evaluates a press),
and how `cache.decode=append` decodes after a prompt compressed once.

    base = model.kv_caches                                         # after a prefill of the context alone
    model.assign_kv_caches([FrozenPrefixCache(c, 64) for c in base])
    model(question, input_pos=context_length)                      # attends base's kept tokens and itself
    ...                                                            # the next question: new FrozenPrefixCache objects

The base cache's kept tokens are never written: they are the same before every question. Where the base stores them
at full precision in its slots 0 .. n-1, the same for every head (every policy but adakv, on a float buffer), the new
tokens go into slots n, n+1, ... of the base's own buffer, grown once to hold them (`make_room`), and a step attends
one contiguous run of slots through one fused call. Otherwise (quantized buffers, heads padded to their longest,
a model-level sliding window) they go into a buffer of their own and the two are attended as two segments.
Not registered: it wraps a cache, it is not one of the strategies a sweep compares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caches.base import KVCache, KVCacheParams
from caches.buffers import KVBuffer, buffer_nbytes, make_buffer
from model.attention import Visibility, attention, grouped_attention


def make_room(cache: KVCache, slots: int) -> None:
    """At least `slots` slots in the cache's float buffer, what it holds kept: a larger buffer replaces it (the first
    time only; `drop_room` gives the cache its own size back)."""
    buf = cache.buf
    B, G, S, hs = buf.k.shape  # (batch, groups, slots, head_size)
    if S >= slots:
        return
    grown = KVBuffer(B, G, slots, hs, buf.k.device, buf.dtype)
    grown.k[:, :, :S], grown.v[:, :, :S] = buf.k, buf.v
    cache.own_slots = getattr(cache, "own_slots", S)
    cache.buf = grown


def drop_room(cache: KVCache) -> None:
    """The buffer back at the size the cache made it (what it held is dropped: a prefill comes next)."""
    slots = getattr(cache, "own_slots", None)
    if slots is not None:
        B, G, _, hs = cache.buf.k.shape  # (batch, groups, slots, head_size)
        cache.buf = KVBuffer(B, G, slots, hs, cache.buf.k.device, cache.buf.dtype)
        del cache.own_slots


class FrozenPrefixCache(KVCache):
    name = "frozen_prefix"

    def __init__(self, base: KVCache, slots: int) -> None:
        p = base.params
        super().__init__(KVCacheParams(p.batch_size, p.n_query_groups, p.n_head, p.head_size, slots, p.device, p.dtype))
        if base.next_token_pos is None:
            raise ValueError("the base cache is empty: prefill it first")
        self.base = base
        self.start = self.next_token_pos = base.next_token_pos
        # a cache whose heads keep different numbers of tokens (adakv) reads back padded (position -1): masked. The
        # base is frozen, so this is decided once
        self.padded = bool((base.token_positions() < 0).any())
        self.batch_size = base.batch_size
        self.attn_opts = base.attn_opts
        self.contiguous = (
            type(base).kept_kv is KVCache.kept_kv  # the kept tokens are slots 0 .. n-1 of `base.buf`
            and type(base.buf) is KVBuffer  # full precision
            and not self.padded
            and self.attn_opts.sliding_window is None
        )
        if self.contiguous:
            self.n_kept = base.token_positions().shape[-1]
            make_room(base, self.n_kept + slots)
        else:
            self.buf = make_buffer(self.params)  # the appended tokens, at full precision
            # a padded read (adakv's heads gathered from its flat buffer) is a copy made per read: made once here and
            # counted in `size_estimate`. Any other base is read as it is at every call (views, or a quantized
            # buffer's dequantized copy: that cache's cost, and no copy held beside it)
            self.padded_kv = base.kept_kv(base.batch_size) if self.padded else None

    def _prefill(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        raise ValueError("a frozen prefix takes no new prefill: wrap a freshly prefilled cache instead")

    def _extend(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        if self.contiguous:
            return self._extend_contiguous(query, key, value, input_pos)
        B, _, T, _ = key.shape
        offset, end = input_pos - self.start, input_pos - self.start + T
        self.buf.write_range(B, offset, key, value)
        old_k, old_v, positions = self.padded_kv or self.base.kept_kv(B)  # (B, G, n, hs), positions (B, G, n)
        old_k, old_v, positions = old_k[:B], old_v[:B], positions[:B]
        new_k, new_v = self.buf.read(B, end)  # (B, G, end, hs)
        new_pos = torch.arange(self.start, self.start + end, device=key.device)
        segments = [
            (old_k, old_v, Visibility(q_start=input_pos, k_pos=positions, all_visible=not self.padded)),
            (new_k, new_v, Visibility(q_start=input_pos, k_pos=new_pos, k_start=self.start)),
        ]
        out, _ = grouped_attention(query, segments, self.attn_opts)
        return out

    def _extend_contiguous(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        """The new tokens after the kept ones in the base's buffer; one call over slots 0 .. kept + end - 1."""
        B, _, T, _ = key.shape
        buf, end = self.base.buf, input_pos - self.start + T
        buf.write_range(B, self.n_kept + input_pos - self.start, key, value)
        k, v = buf.read(B, self.n_kept + end)  # (B, G, kept + end, hs)
        if T == 1:
            vis = Visibility(q_start=input_pos, all_visible=True)  # a decode step sees every slot
        else:
            # every kept token precedes the queries (position 0 stands for all of them); the new ones are causal
            k_pos = torch.arange(self.start - self.n_kept, self.start + end, device=key.device).clamp_(min=0)
            vis = Visibility(q_start=input_pos, k_pos=k_pos)
        return attention(query, k, v, vis, self.attn_opts)[0]

    def token_positions(self) -> Tensor:
        n = (self.next_token_pos or self.start) - self.start
        new = torch.arange(self.start, self.start + n, device=self.params.device)
        base = self.base.token_positions()
        return torch.cat([base, new.expand(*base.shape[:2], n)], dim=-1)

    def size_estimate(self) -> int:
        """The base's bytes, the appended tokens', and the padded copy of what the base keeps where one is held."""
        held = 0 if self.contiguous or self.padded_kv is None else sum(t.nbytes for t in self.padded_kv)
        return super().size_estimate() + held

    @classmethod
    def size_estimate_apriori(cls, params: KVCacheParams, **kwargs) -> int:
        return buffer_nbytes(params)
