"""Tolerances from what a check means: the dtype's resolution and the magnitudes compared, never a constant that held
on one machine.

Two evaluations of one computation that differ only in the order of their sums (another kernel, a fused or compiled
one, another thread count, another CPU's BLAS) round differently. A sum of n terms in floating point carries a
relative error of at most about n·u (u = eps / 2, eps the dtype's machine epsilon; Higham, Accuracy and Stability of
Numerical Algorithms, 2nd ed., section 3.1), so two such sums differ by at most n·eps relative to the magnitudes
summed; through a chain of sums (a model's layers) the relative errors add, to first order. `bound` turns the number
of terms along the longest chain into an absolute tolerance on the values compared, their largest magnitude standing
for the magnitudes summed (softmax-weighted means and logits here do not cancel far below their terms). A real error
(a wrong token kept, a wrong position, a missing mask) moves the values by orders of magnitude more.

A quantized buffer adds its own resolution: one level of its code, (max - min) / (2^bits - 1) of the values it
stores (`level`).
"""

from __future__ import annotations

import torch
from torch import Tensor


def attention_terms(head_size: int, keys: int) -> int:
    """The sums along one attention output: a score (head_size products), then the weighted mean over the keys."""
    return head_size + keys


def model_terms(config, keys: int) -> int:
    """The sums along one logit of a model: per layer the q/k/v projection, attention over `keys` keys, the output
    projection, the MLP's two projections; then the output head."""
    c = config
    per_layer = c.n_embd + attention_terms(c.head_size, keys) + c.n_head * c.head_size + c.n_embd + c.intermediate_size
    return c.n_layer * per_layer + c.n_embd


def bound(reference: Tensor, terms: int, dtype: torch.dtype | None = None) -> float:
    """How far another evaluation of `reference` in another summation order may lie from it: terms x eps x its
    largest magnitude (eps of `dtype`, default the reference's)."""
    eps = torch.finfo(dtype or reference.dtype).eps
    return terms * eps * float(reference.abs().max())


def level(values: Tensor, bits: int) -> float:
    """One level of a `bits`-bit quantizer over the range of `values`."""
    return float(values.max() - values.min()) / (2**bits - 1)


def assert_within(got: Tensor, expected: Tensor, tolerance: float, what: str = "") -> None:
    """max |got - expected| <= tolerance, saying by how much it is within or over."""
    delta = float((got.double() - expected.double()).abs().max())
    assert delta <= tolerance, f"{what} max |difference| {delta:.3g} > bound {tolerance:.3g}"
