"""How a model's layers share a KV budget: `uniform` (every layer the same slots) or `pyramid` (PyramidKV, Cai et al.,
2024: the first layers, whose attention is spread wide, get the most; the last, whose attention is focused, the
fewest, in an arithmetic sequence whose total is the uniform one's).

    layer_budgets("pyramid", per_layer=512, n_layer=16, window=32)   # 16 slot counts, summing to 16 x 512

The pyramid, as PyramidKV's reference code builds it: the last layer keeps per_layer / beta, the first
2 x per_layer - per_layer / beta, the layers between on the line joining them; capped at `longest` (the longest
sequence the caches will see), the first layer's count comes down to it and the last's goes up by as much; where
the counts would fall below the observation window or pass the sequence, every layer gets the uniform count.
Rounded so that the total is exactly n_layer x per_layer.
"""

from __future__ import annotations

ALLOCATIONS = ("uniform", "pyramid")


def layer_budgets(
    policy: str, per_layer: int, n_layer: int, window: int = 32, beta: float = 20.0, longest: int | None = None
) -> list[int]:
    if policy not in ALLOCATIONS:
        raise ValueError(f"allocation {policy!r} is not valid; valid choices: {', '.join(ALLOCATIONS)}")
    if policy == "uniform" or n_layer == 1:
        return [per_layer] * n_layer
    low = per_layer / beta
    high = 2 * per_layer - low
    if longest is not None and high > longest:
        high = float(longest)
        low = 2 * per_layer - high
    if low < window or (longest is not None and high > longest):
        return [per_layer] * n_layer
    step = (high - low) / (n_layer - 1)
    exact = [high - i * step for i in range(n_layer)]
    counts = [int(x) for x in exact]
    # largest remainders first, so that the counts add up to the uniform total exactly
    for i in sorted(range(n_layer), key=lambda i: exact[i] - counts[i], reverse=True)[
        : n_layer * per_layer - sum(counts)
    ]:
        counts[i] += 1
    return counts
