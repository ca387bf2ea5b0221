"""`dense`: every token is kept, in slot order (slot i holds position i). The baseline every cache is judged by."""

from __future__ import annotations

import torch
from torch import Tensor

from caches.base import KVCache, KVCacheParams, register
from model.attention import Visibility


@register("dense")
class DenseCache(KVCache):
    def __init__(self, params: KVCacheParams) -> None:
        super().__init__(params)
        self.register_buffer(
            "k", torch.zeros(params.kv_shape, device=params.device, dtype=params.dtype), persistent=False
        )
        self.register_buffer(
            "v", torch.zeros(params.kv_shape, device=params.device, dtype=params.dtype), persistent=False
        )

    @property
    def max_prefill_length(self) -> int:
        return self.cache_length

    def _check_room(self, end: int) -> None:
        if end > self.cache_length:
            raise ValueError(
                f"dense cache is full: {end} tokens do not fit in cache_length={self.cache_length} "
                "(allocate a longer cache, or use an evicting cache such as last_recent)"
            )

    def _prefill(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        B, _, T, _ = key.shape
        self._check_room(T)
        self.k[:B, :, :T] = key
        self.v[:B, :, :T] = value
        # Causal attention among the new tokens: is_causal, no mask.
        return self._attend(query, key, value, Visibility(q_start=0))

    def _extend(self, query: Tensor, key: Tensor, value: Tensor, input_pos: int) -> Tensor:
        B, _, T, _ = key.shape
        end = input_pos + T
        self._check_room(end)
        self.k[:B, :, input_pos:end] = key
        self.v[:B, :, input_pos:end] = value
        # A decode step sees every key (no mask); a chunk builds its own (T, end) causal slice.
        return self._attend(query, self.k[:B, :, :end], self.v[:B, :, :end], Visibility(q_start=input_pos))

    def token_positions(self) -> Tensor:
        n = self.next_token_pos or 0
        positions = torch.arange(n, device=self.k.device)
        return positions.expand(self.batch_size or self.params.batch_size, self.params.n_query_groups, n)

    @classmethod
    def size_estimate_apriori(cls, params: KVCacheParams) -> int:
        B, G, L, hs = params.kv_shape
        return 2 * B * G * L * hs * params.itemsize
