"""`random`: uniform random eviction, the floor every method must beat. A token's score is a hash of (seed, sequence,
KV head, position) mapped to [0, 1), fixed when it enters, so runs repeat exactly and the compiled decode step (no
random number generator in the graph) keeps the eager step's tokens. When slots are needed the lowest scores go."""

from __future__ import annotations

import torch
from torch import Tensor

from caches.base import KVCacheParams, register
from caches.scored import Candidates, ScoredCache


def uniform_hash(seed: int, b: Tensor, g: Tensor, pos: Tensor) -> Tensor:
    """A value in [0, 1) per (seed, b, g, pos), int64 arithmetic on the device that never overflows (every product
    stays below 2**63; tests/naive_eviction.py has the same in plain Python): an integer hash mixed twice, its top
    24 bits of 32 kept."""
    m = 73244475  # 0x45d9f3b
    x = (pos * m + b * 40503 + g * 9973 + seed * 2654435) % 4294967296
    x = (((x >> 16) ^ x) * m) % 4294967296
    x = (((x >> 16) ^ x) * m) % 4294967296
    return (((x >> 16) ^ x) >> 8).float() / 16777216.0


@register("random")
class RandomCache(ScoredCache):
    decode_weights = False  # a decode step needs no attention weights: it decodes through one fused call
    decode_keeps_scores = True

    def __init__(self, params: KVCacheParams, seed: int = 0, buffer: str = "float", group_size: int = 32) -> None:
        super().__init__(params, buffer, group_size)
        self.seed = seed

    def weights_from(self, T: int) -> None:
        return None

    def candidate_scores(self, c: Candidates) -> Tensor:
        B, G, T = c.new_k.shape[:3]
        b = torch.arange(B, device=c.new_pos.device).view(B, 1, 1)
        g = torch.arange(G, device=c.new_pos.device).view(1, G, 1)
        new = uniform_hash(self.seed, b, g, c.new_pos)  # (B, G, T)
        return torch.cat([c.old_score, new], dim=-1)
