"""`keydiff`: evict the keys most similar to the mean key (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache
Eviction"). Query-free: per sequence and KV head the anchor is the mean of the candidates' unit-length keys (the
buffered and the call's new ones); a token's score is minus its key's cosine similarity to the anchor, recomputed
at every call (the anchor moves); the lowest go. A chunked prefill is the paper's block-wise compression: each chunk
scores the buffer and its own keys together."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from caches.base import register
from caches.scored import Candidates, ScoredCache


@register("keydiff")
class KeyDiffCache(ScoredCache):
    decode_weights = False  # a decode step needs no attention weights: it decodes through one fused call

    def weights_from(self, T: int) -> None:
        return None

    def candidate_scores(self, c: Candidates) -> Tensor:
        keys = F.normalize(c.keys().float(), dim=-1)  # (B, G, n + T, hs)
        filled = (c.pos >= 0).unsqueeze(-1)  # empty slots of a fixed-shape step take no part in the anchor
        anchor = (keys * filled).sum(dim=2, keepdim=True) / filled.sum(dim=2, keepdim=True).clamp_min(1)
        return -F.cosine_similarity(keys, anchor, dim=-1)  # (B, G, n + T)
