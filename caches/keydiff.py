"""`keydiff`: evict the keys most similar to the mean key (Park et al., 2025, "KeyDiff: Key Similarity-Based KV Cache
Eviction"). Query-free: per sequence and KV head the anchor is the mean of the candidates' unit-length keys (the
buffered and the call's new ones); a token's score is minus its key's cosine similarity to the anchor, recomputed
at every call (the anchor moves); the lowest go. A chunked prefill is the paper's block-wise compression: each chunk
scores the buffer and its own keys together."""

from __future__ import annotations

from torch import Tensor

from caches.base import register
from caches.scored import Candidates, ScoredCache


@register("keydiff")
class KeyDiffCache(ScoredCache):
    decode_weights = False  # a decode step needs no attention weights: it decodes through one fused call

    def weights_from(self, T: int) -> None:
        return None

    def candidate_scores(self, c: Candidates) -> Tensor:
        # cos(k, anchor) does not change with the anchor's length: the sum of the unit keys serves, and no unit copy
        # of the keys is made (two matrix-vector products over them)
        keys = c.keys().float()  # (B, G, n + T, hs)
        inverse_norm = keys.norm(dim=-1).clamp_min(1e-30).reciprocal_()  # (B, G, n + T)
        if not c.no_empty:  # an empty slot of a fixed-shape step takes no part in the anchor
            inverse_norm = inverse_norm.masked_fill_(c.pos < 0, 0)
        anchor = inverse_norm.unsqueeze(-2) @ keys  # (B, G, 1, hs)
        dots = (keys @ anchor.transpose(-1, -2)).squeeze(-1)  # (B, G, n + T)
        return dots.mul_(inverse_norm).div_(anchor.norm(dim=-1).clamp_min(1e-30)).neg_()
