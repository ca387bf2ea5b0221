"""`dense`: every token is kept, in slot order (slot i holds position i). The baseline every cache is judged by.
Runs on any buffer (`buffer="int8"` stores quantized K/V; a prefill attends its own tokens at full precision,
everything read back from the cache is dequantized)."""

from __future__ import annotations

import torch
from torch import Tensor

from caches.base import KVCache, KVCacheParams, register
from caches.buffers import buffer_nbytes, make_buffer
from model.attention import Visibility


@register("dense")
class DenseCache(KVCache):
    supports_compiled_decode = True
    compiled_by_default = True
    keeps_every_token = True
    keeps_window = True
    shares_prefill = True

    def __init__(self, params: KVCacheParams, buffer: str = "float", group_size: int = 32) -> None:
        super().__init__(params)
        self.buf = make_buffer(params, buffer, group_size)

    @property
    def max_prefill_length(self) -> int:
        return self.cache_length

    def check_position(self, B: int, T: int, input_pos: int) -> None:
        super().check_position(B, T, input_pos)
        self._check_room(input_pos + T)

    def _check_room(self, end: int) -> None:
        if end > self.cache_length:
            raise ValueError(
                f"dense cache is full: {end} tokens do not fit in cache_length={self.cache_length} "
                "(allocate a longer cache, or use an evicting cache such as last_recent)"
            )

    def _prefill(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        B = key.shape[0]
        self.buf.reset()
        self.buf.write_range(B, 0, key, value)
        # Causal attention among the new tokens: is_causal, no mask.
        return self._attend(query, key, value, Visibility(q_start=0))

    def _load(self, prompt) -> None:
        self.buf.reset()
        self.buf.write_range(prompt.key.shape[0], 0, prompt.key, prompt.value)

    def _extend(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        B, _, T, _ = key.shape
        end = input_pos + T
        self.buf.write_range(B, input_pos, key, value)
        k, v = self.buf.read(B, end)  # (B, G, end, hs)
        # A decode step sees every key (no mask); a chunk builds its own (T, end) causal slice.
        return self._attend(query, k, v, Visibility(q_start=input_pos))

    def decode_step(self, query: Tensor, key: Tensor, value: Tensor, pos: Tensor) -> Tensor:
        B = key.shape[0]
        self.buf.write_slots(B, pos.view(1), key, value)
        return self.buf.attend_all(query, B, pos + 1, self.attn_opts)  # slot i holds position i

    def token_positions(self) -> Tensor:
        n = self.next_token_pos or 0
        positions = torch.arange(n, device=self.params.device)
        return positions.expand(self.batch_size or self.params.batch_size, self.params.n_query_groups, n)

    @classmethod
    def size_estimate_apriori(cls, params: KVCacheParams, buffer: str = "float", group_size: int = 32) -> int:
        return buffer_nbytes(params, buffer, group_size)
