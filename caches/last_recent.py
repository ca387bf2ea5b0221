"""`last_recent`: a ring buffer of the most recent tokens, plus `sink_tokens` first tokens kept for good
(StreamingLLM's attention sinks, Xiao et al., 2023).

Semantics. With L = cache_length slots, s = sink_tokens and W = L - s, the query at position q sees exactly

    the sinks {k : k < s}  and  the window {k : q - W < k <= q}

which is what the cache holds right after token q has been written. This holds for every call, whatever its
length: a decode step writes its token, evicting position q - W, then attends over all filled slots (no mask).
A prefill or chunk longer than the buffer is attended in query blocks against the old contents plus the new
keys each block may see, under an explicit sliding-window-with-sinks mask built for that block only; only then
are the tokens that survive (the sinks and the last W) written to their slots. Slot of position p: p if p < s,
else s + (p - s) mod W. Filled slots always form a prefix of the buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caches.base import KVCache, KVCacheParams, register
from caches.buffers import buffer_nbytes, make_buffer
from model.attention import MASK_ELEMENTS, Visibility


@register("last_recent")
class LastRecentCache(KVCache):
    supports_compiled_decode = True
    keeps_window = True
    compiled_by_default = True
    query_block: int = 1024  # query rows per attention call when a chunk must be masked

    def __init__(
        self,
        params: KVCacheParams,
        sink_tokens: int = 4,
        buffer: str = "float",
        group_size: int = 32,
    ) -> None:
        super().__init__(params)
        if not 0 <= sink_tokens < params.cache_length:
            raise ValueError(f"sink_tokens must be in [0, cache_length={params.cache_length}), got {sink_tokens}")
        self.sink_tokens = sink_tokens
        self.window = params.cache_length - sink_tokens
        self.buf = make_buffer(params, buffer, group_size)
        # Token position held by each slot (-1: empty); the same for every sequence and head.
        self.register_buffer(
            "pos", torch.full((params.cache_length,), -1, device=params.device, dtype=torch.long), persistent=False
        )

    @property
    def causal_prefix(self) -> int:
        """Query q < cache_length sees every position before it (its window reaches back past the sinks), so the
        first cache_length positions of its own prefill are plain causal attention; under a model-level window
        (a hybrid's windowed layer) none are claimed."""
        return self.cache_length if self.attn_opts.sliding_window is None else 0

    def _slot(self, position: int) -> int:
        s = self.sink_tokens
        return position if position < s else s + (position - s) % self.window

    def _prefill(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        self.pos.fill_(-1)
        self.buf.reset()
        return self._chunk(query, key, value, 0)

    def _extend(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        if key.shape[2] == 1:
            return self._decode(query, key, value, input_pos)
        return self._chunk(query, key, value, input_pos)

    def _decode(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        B = key.shape[0]
        slot = self._slot(input_pos)
        self.buf.write_range(B, slot, key, value)
        self.pos[slot] = input_pos
        n = min(input_pos + 1, self.cache_length)
        k, v = self.buf.read(B, n)  # (B, G, n, hs)
        # the buffer now holds exactly what q may see (the positions say so to a model-level window's mask)
        vis = Visibility(q_start=input_pos, k_pos=self.pos[:n], all_visible=True)
        return self._attend(query, k, v, vis)

    def decode_step(self, query: Tensor, key: Tensor, value: Tensor, pos: Tensor) -> Tensor:
        """`_decode` with the position on the device: the slot computed there, the whole buffer attended with
        the empty slots masked (the ring holds exactly what the query may see)."""
        B, s = key.shape[0], self.sink_tokens
        slot = torch.where(pos < s, pos, s + (pos - s).remainder(self.window)).view(1)  # (1,)
        self.buf.write_slots(B, slot, key, value)
        self.pos.index_copy_(0, slot, pos.view(1))
        filled = torch.clamp(pos + 1, max=self.cache_length)  # filled slots form a prefix of the buffer
        return self.buf.attend_all(query, B, filled, self.attn_opts)

    def _chunk(self, query: Tensor, key: Tensor, value: Tensor, p: int) -> Tensor:
        B, _, T, _ = key.shape
        L, s, W = self.cache_length, self.sink_tokens, self.window
        if p + T <= L:
            # Nothing is evicted: slots == positions, plain causal attention (is_causal at p == 0).
            self.buf.write_range(B, p, key, value)
            self.pos[p : p + T] = torch.arange(p, p + T, device=self.pos.device)
            if p == 0:
                return self._attend(query, key, value, Visibility(q_start=0))
            k, v = self.buf.read(B, p + T)  # (B, G, p + T, hs)
            return self._attend(query, k, v, Visibility(q_start=p))
        out = torch.empty_like(query)  # (B, n_head, T, hs)
        n_old = min(p, L)
        (old_k, old_v), old_pos = self.buf.read(B, n_old), self.pos[:n_old]
        new_sinks = max(0, min(s - p, T))  # new tokens that are sinks (only when the chunk starts before s)
        # Query rows per block: the block's masks (two boolean (rows, keys) tensors with a window) together take at
        # most half the bytes of the largest mask dense's masked calls build (MASK_ELEMENTS).
        rows = max(1, min(self.query_block, MASK_ELEMENTS // (4 * (n_old + T))))
        for i0 in range(0, T, rows):
            i1 = min(T, i0 + rows)
            j0 = max(0, i0 - W + 1)  # first new key inside the window of query i0
            idx = list(range(min(new_sinks, j0))) + list(range(j0, i1))  # new keys this block may see
            sel = torch.tensor(idx, device=key.device)
            keys = torch.cat([old_k, key.index_select(2, sel)], dim=2)  # (B, G, n_old + len(idx), hs)
            vals = torch.cat([old_v, value.index_select(2, sel)], dim=2)  # (B, G, n_old + len(idx), hs)
            k_pos = torch.cat([old_pos, sel + p])  # (n_old + len(idx),)
            vis = Visibility(q_start=p + i0, k_pos=k_pos, window=W, sinks=s)
            out[:, :, i0:i1] = self._attend(query[:, :, i0:i1], keys, vals, vis)
        self._write_survivors(key, value, p)
        return out

    def _write_survivors(self, key: Tensor, value: Tensor, p: int) -> None:
        """Of a chunk's keys and values (B, G, T, hs) at positions p.., write those the cache keeps: the new sinks,
        then the last W new positions that are not sinks."""
        B, _, T, _ = key.shape
        s, W = self.sink_tokens, self.window
        new_sinks = max(0, min(s - p, T))
        keep = list(range(p, p + new_sinks)) + list(range(max(s, p, p + T - W), p + T))
        positions = torch.tensor(keep, device=key.device)
        slots = torch.tensor([self._slot(q) for q in keep], device=key.device)
        self.buf.write_slots(B, slots, key.index_select(2, positions - p), value.index_select(2, positions - p))
        self.pos.index_copy_(0, slots, positions)

    def _load(self, prompt) -> None:
        """A recorded prompt's survivors. The recording attended causally under the layer's own window, which is this
        cache's own prefill only where the prompt fits (nothing evicted) or where the layer's window is this cache's
        and there are no sinks (a hybrid model's windowed layer); elsewhere loading is refused (last_recent under test
        runs its own prefill)."""
        T = prompt.key.shape[2]
        if T > self.cache_length and (self.sink_tokens or self.attn_opts.sliding_window != self.window):
            raise NotImplementedError(
                f"last_recent with {self.sink_tokens} sinks and {self.window} window slots runs its own prefill of "
                f"{T} tokens (the layer's own window is {self.attn_opts.sliding_window})"
            )
        self.pos.fill_(-1)
        self.buf.reset()
        self._write_survivors(prompt.key, prompt.value, 0)

    def token_positions(self) -> Tensor:
        n = min(self.next_token_pos or 0, self.cache_length)
        return self.pos[:n].expand(self.batch_size or self.params.batch_size, self.params.n_query_groups, n)

    @classmethod
    def size_estimate_apriori(cls, params: KVCacheParams, buffer: str = "float", group_size: int = 32, **knobs) -> int:
        """sink_tokens does not change the bytes."""
        return buffer_nbytes(params, buffer, group_size) + params.cache_length * 8  # K/V and int64 slot positions
