"""`tova`: Token Omission Via Attention (Oren et al., 2024).

When slots are needed, the tokens with the lowest attention weight from the current query (the call's last
query), averaged over the query group's heads, go; the new token itself competes too. Scores are not
accumulated: each call replaces them. Mechanics: caches/scored.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caches.base import register
from caches.scored import ScoredCache


@register("tova")
class TOVACache(ScoredCache):
    def weights_from(self, T: int) -> int:
        return T - 1

    def candidate_scores(self, old: Tensor, w_old: Tensor | None, w_new: Tensor | None, T: int) -> Tensor:
        return w_new if w_old is None else torch.cat([w_old, w_new], dim=-1)
