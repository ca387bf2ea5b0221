"""Timers: the wall time of a block with the device synchronised on both sides, and the median's confidence
interval that every timed row carries."""

from __future__ import annotations

import random
import statistics
import time
from contextlib import contextmanager

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(device: torch.device, out: list[float]):
    """Append the wall seconds of the block to `out`, with the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    yield
    sync(device)
    out.append(time.perf_counter() - t0)


def median_interval(values: list[float], resamples: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """The median's `level` confidence interval by the percentile bootstrap (`resamples` resamples, seeded: the same
    values give the same interval)."""
    rng = random.Random(0)
    n = len(values)
    medians = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    tail = (1 - level) / 2
    return medians[int(tail * (resamples - 1))], medians[int(round((1 - tail) * (resamples - 1)))]
