"""`qh2o`: quantization-aware H2O (Q-Hitter, Zhang et al., MLSys 2024).

Runs on a quantized buffer (int4 by default). A token is worth keeping when it is a heavy hitter and when it
survives quantization well, so the ranking key is the convex combination

    alpha * minmax(H2O score) + (1 - alpha) * (1 - minmax(K+V quantization error))

min-max normalised over the candidates of each sequence and KV head (the error is the L2 norm of what
quantizing the token's key and value loses, measured when it is written). The recent window is kept as in h2o.
"""

from __future__ import annotations

from torch import Tensor

from caches.base import KVCacheParams, register
from caches.h2o import H2OCache
from caches.scored import minmax


@register("qh2o")
class QH2OCache(H2OCache):
    uses_quant_error = True
    headwise = False  # ranks by a quantization error kept per slot
    default_buffer = "int4"

    def __init__(
        self,
        params: KVCacheParams,
        alpha: float = 0.5,
        recent: int | None = None,
        normalize_scores: bool = False,
        buffer: str = "int4",
        group_size: int = 32,
    ) -> None:
        if buffer == "float":
            raise ValueError("qh2o runs on a quantized buffer: buffer must be int8 or int4")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        super().__init__(params, recent, normalize_scores, buffer, group_size)
        self.alpha = alpha

    def rank(self, scores: Tensor, cand_pos: Tensor, cand_err: Tensor | None, end: int) -> Tensor:
        heavy = minmax(super().rank(scores, cand_pos, cand_err, end))
        return self.alpha * heavy + (1 - self.alpha) * (1 - minmax(cand_err))
