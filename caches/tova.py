"""`tova`: Token Omission Via Attention (Oren et al., 2024).

When slots are needed, the tokens with the lowest attention weight from the current query (the call's last
query), averaged over all the layer's heads, go; the new token itself competes too. One decision per sequence and
layer, the same tokens kept in every KV head: the paper's rule, and its reference implementation's. Scores are not
accumulated: each call replaces them. Mechanics: caches/scored.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caches.base import register
from caches.scored import Candidates, ScoredCache


@register("tova")
class TOVACache(ScoredCache):
    headwise = False  # the heads' weights averaged: one score per token for every head

    def weights_from(self, T: int) -> int:
        return T - 1

    def candidate_scores(self, c: Candidates) -> Tensor:
        # Every KV head holds the same tokens in the same slots (the same scores always made the same choice), so
        # slot i means one token in every head: average its weight over the groups (each already summed over its
        # query heads), the same score for every head.
        weights = c.w_new if c.w_old is None else torch.cat([c.w_old, c.w_new], dim=-1)  # (B, G, n + T)
        return weights.mean(dim=1, keepdim=True).expand_as(weights)  # (B, G, n + T)
