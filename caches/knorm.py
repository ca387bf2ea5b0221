"""`knorm`: keep the keys of lowest L2 norm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for
KV Cache Compression"). Query-free: a token's score, -||k||, is fixed when it enters; when slots are needed the
highest-norm keys go, per sequence and KV head, nothing protected. Mechanics: caches/scored.py."""

from __future__ import annotations

import torch
from torch import Tensor

from caches.base import register
from caches.scored import Candidates, ScoredCache


@register("knorm")
class KnormCache(ScoredCache):
    decode_weights = False  # a decode step needs no attention weights: it decodes through one fused call
    decode_keeps_scores = True

    def weights_from(self, T: int) -> None:
        return None  # no attention weights: the keys decide

    def candidate_scores(self, c: Candidates) -> Tensor:
        new = -c.new_k.float().norm(dim=-1)  # (B, G, T)
        return torch.cat([c.old_score, new], dim=-1)
