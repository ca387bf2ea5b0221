"""Multi-head attention over whatever keys a KV cache hands in (prefill, chunks and eager decode steps; the
compiled decode step's fixed-shape forms are in model/decode_attention.py).

The rules (docs/design.md, "Attention rules"):

* No mask cache. Who may see whom is described by token positions (`Visibility`) and turned into the cheapest
  form for this one call: `is_causal=True` for a causal prefill at position 0 (no mask at all), nothing for a
  decode step that sees every key, otherwise a boolean (T, S) slice for this chunk only. The eager path builds
  it per query block, (block, S) at a time. Forced flash on CUDA takes no mask: a chunk over every earlier token
  goes to it as `causal_lower_right` (its causal flag, aligned to the last key) instead.
* GQA: K/V arrive with n_query_groups heads and are never expanded when the query is shorter than the keys:
  SDPA gets `enable_gqa=True`; the eager path multiplies grouped queries (B, G, q_per_kv * T, hs) by the
  group's keys.
* The backend (flash, efficient, cudnn, math, or our eager path) can be forced per call. A backend that
  cannot run the call raises `UnsupportedBackend` with the reason; there is no silent fallback. `auto` lets
  PyTorch choose among the fused kernels, memory-friendly ones first, and reports what it chose.
* Score-based caches need the softmax weights each key received, summed over the queries of its KV group:
  the eager path returns them, computed block by block in the same pass.

Which backend ran is not kept by anyone: `attention()` returns it, and every call made inside a
`record_backends()` block adds it to that block's set (the harness's `sdpa_used` columns).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

# torch.nn.attention.bias imports torch._dynamo, and inductor and triton with it: their code would be resident memory
# in every job's process. Only forced flash on CUDA uses it (bottom-right causal chunks), so it is imported there,
# and an eager job's peak RSS holds no compiler it never runs.
if TYPE_CHECKING:
    from torch.nn.attention.bias import CausalBias

BACKENDS = ("auto", "flash", "efficient", "cudnn", "math", "eager")
_SDP = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
_SDP_NAME = {v: k for k, v in _SDP.items()}
# Most mask elements one SDPA call builds: a masked call whose mask would be larger runs in query blocks
# (16 Mi elements: 16 MiB as bool, 32 MiB as the bf16 additive mask SDPA converts it to).
MASK_ELEMENTS = 1 << 24
# `auto`: fused kernels first, cuDNN before mem-efficient (the latter has no enable_gqa), math last because it
# materialises the (T, S) scores of every head.
_AUTO_PRIORITY = [
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


class UnsupportedBackend(RuntimeError):
    """The requested attention backend has no kernel for this call (a result to record, not a bug)."""


_RECORDERS: list[set[str]] = []


@contextmanager
def record_backends() -> Iterator[set[str]]:
    """`with record_backends() as used:` collects the backend of every attention call made inside the block."""
    used: set[str] = set()
    _RECORDERS.append(used)
    try:
        yield used
    finally:
        _RECORDERS.remove(used)


def record(backend: str) -> None:
    """Tell the open `record_backends()` blocks that `backend` ran a call."""
    for used in _RECORDERS:
        used.add(backend)


@dataclass
class AttentionOptions:
    backend: str = "auto"
    scale: float | None = None  # None: 1 / sqrt(head_size)
    softcap: float | None = None  # tanh softcapping of the logits (eager path only)
    sliding_window: int | None = None  # model-level window (eager path only)
    block_size: int = 256  # query rows per block in the eager path
    # How a compiled decode step attends its buffer (model/decode_attention.py), set by CompiledDecode: the
    # form and, for the Triton kernel, its resolved launch options. Not a user setting.
    decode_form: str = "sdpa"
    launch: dict | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.backend!r}; valid choices: {', '.join(BACKENDS)}")


@dataclass
class Visibility:
    """Which keys each query of this call may see, in token positions.

    Queries hold the consecutive positions q_start .. q_start + T - 1. A query at position q sees a key at position
    k when k <= q, and, if `window` is set, q - window < k or k < sinks. Keys at position -1 are empty slots.
    """

    q_start: int
    k_pos: Tensor | None = None  # (S,) or (B, G, S); None: the keys hold positions 0 .. S-1 in order
    window: int | None = None
    sinks: int = 0
    all_visible: bool = False  # the caller knows every key is visible to every query: no mask at all
    k_start: int | None = None  # the keys hold consecutive positions from k_start (k_pos None means 0)

    def visible_prefix(self, t1: int, n_keys: int) -> int:
        """How many leading keys queries 0 .. t1-1 may see at most: all of them unless the keys are in order,
        in which case the ones after the block's last query are skipped (half the work of a causal prefill)."""
        start = 0 if self.k_pos is None else self.k_start
        if start is None or self.all_visible:
            return n_keys
        return max(0, min(n_keys, self.q_start + t1 - start))


def visible_mask(q_pos: Tensor, k_pos: Tensor, window: int | None = None, sinks: int = 0) -> Tensor:
    """Boolean mask (..., T, S) from query positions (T,) and key positions (..., S); True = may attend.
    One full-size allocation (two with a window): the rest is done in place."""
    q = q_pos.view(-1, 1)  # (T, 1)
    k = k_pos.unsqueeze(-2)  # (..., 1, S)
    mask = k <= q  # (..., T, S)
    mask &= k >= 0
    if window is not None:
        outside = k <= q - window  # (..., T, S): too old for the window ...
        outside &= k >= sinks  # ... and not a sink
        mask &= outside.logical_not_()
    return mask


def _needs_mask(vis: Visibility, t0: int, n_keys: int, window: int | None) -> bool:
    """False when queries t0.. of the call see every key: all visible, or keys 0 .. S-1 all at or before them."""
    if vis.all_visible and window is None:
        return False
    return not (vis.k_pos is None and window is None and vis.q_start + t0 >= n_keys - 1)


def mask_rows(
    vis: Visibility, t0: int, t1: int, n_keys: int, device: torch.device, window: int | None
) -> Tensor | None:
    """The mask for queries t0 .. t1-1 of the call: (t1 - t0, S) or (B, G, t1 - t0, S); None if all visible."""
    if not _needs_mask(vis, t0, n_keys, window):
        return None
    if vis.k_pos is None and window is None:
        # keys hold positions 0 .. S-1: query q_start + i sees keys j <= q_start + i
        return torch.ones(t1 - t0, n_keys, dtype=torch.bool, device=device).tril_(vis.q_start + t0)
    q_pos = torch.arange(vis.q_start + t0, vis.q_start + t1, device=device)
    k_pos = vis.k_pos if vis.k_pos is not None else torch.arange(n_keys, device=device)
    return visible_mask(q_pos, k_pos, window, vis.sinks)


def attention(
    query: Tensor, key: Tensor, value: Tensor, vis: Visibility, opts: AttentionOptions, need_weights: bool = False
) -> tuple[Tensor, str, Tensor | None]:
    """query (B, n_head, T, hs); key, value (B, n_query_groups, S, hs).

    Returns (output (B, n_head, T, hs), the backend that ran, weights summed over each group's queries
    (B, n_query_groups, S) in float32 if need_weights else None).
    """
    window = effective_window(vis.window, opts.sliding_window)
    eager_needed = need_weights or opts.softcap is not None or opts.sliding_window is not None
    if opts.backend == "eager" or (eager_needed and opts.backend == "auto"):
        out, weights = eager_attention(query, key, value, vis, opts, need_weights, window)
        return out, "eager", weights
    if eager_needed:
        why = "attention weights" if need_weights else "logit softcapping" if opts.softcap else "a model-level window"
        raise UnsupportedBackend(f"{opts.backend} cannot run this call: {why} need the eager path")
    out, used = sdpa(query, key, value, vis, opts, window)
    record(used)
    return out, used, None


def effective_window(cache_window: int | None, model_window: int | None) -> int | None:
    windows = [w for w in (cache_window, model_window) if w is not None]
    return min(windows) if windows else None


def sdpa(
    query: Tensor, key: Tensor, value: Tensor, vis: Visibility, opts: AttentionOptions, window: int | None = None
) -> tuple[Tensor, str]:
    """PyTorch's scaled_dot_product_attention with a forced (or `auto`) backend; returns (output, backend used)."""
    B, n_head, T, hs = query.shape
    n_groups, S = key.shape[1], key.shape[2]
    gqa = n_groups != n_head
    is_causal = vis.k_pos is None and window is None and vis.q_start == 0 and T == S
    bottom_right = opts.backend == "flash" and _bottom_right_causal(vis, T, S, window)
    if bottom_right and _flash_runs_bottom_right(query, key, value, gqa):
        # A chunk over every earlier key and itself: causal aligned to the last key, which CUDA's flash kernel runs
        # from its flag, with no mask (`causal_lower_right` dispatches to it). With a mask flash has no kernel.
        bias = _lower_right_bias(T, S)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=opts.scale, enable_gqa=gqa)
        return out, "flash"
    planes = 1 if vis.k_pos is None or vis.k_pos.dim() == 1 else B * n_head  # mask (T, S) or (B, n_head, T, S)
    rows = max(1, MASK_ELEMENTS // (planes * S))
    if not is_causal and T > rows and _needs_mask(vis, 0, S, window):
        # A chunk deep into a long context: one (T, S) mask (and SDPA's own float copy of it) would outweigh the
        # chunk's activations (2048 x 32k: 67 MB + 134 MB per layer). Queries are independent: run them in blocks.
        out = query.new_empty(B, n_head, T, value.shape[-1])  # (B, n_head, T, hs)
        used = None
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            out[:, :, t0:t1], used = sdpa(
                query[:, :, t0:t1], key, value, replace(vis, q_start=vis.q_start + t0), opts, window
            )
        return out, used
    mask = None if is_causal else mask_rows(vis, 0, T, S, query.device, window)
    if mask is not None and mask.dim() == 4 and gqa:
        # A per-(sequence, group) mask must name every query head for SDPA; this copies the mask, never K/V.
        mask = mask.unsqueeze(2).expand(B, n_groups, n_head // n_groups, T, S).reshape(B, n_head, T, S)
    if opts.backend == "efficient" and gqa:
        if T < S:
            raise UnsupportedBackend(
                f"efficient has no enable_gqa, and K/V are not expanded when the query is shorter than the keys "
                f"(T={T}, S={S})"
            )
        # A full prefill may expand (as every GQA model does without enable_gqa): (B, n_head, S, hs)
        key = key.repeat_interleave(n_head // n_groups, dim=1)
        value = value.repeat_interleave(n_head // n_groups, dim=1)
        gqa = False
    used = choose_backend(query, key, value, mask, is_causal, gqa, opts.backend)
    try:
        with sdpa_kernel(*kernel_order(opts.backend)):
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=mask, is_causal=is_causal, scale=opts.scale, enable_gqa=gqa
            )
    except RuntimeError as err:
        if "No available kernel" in str(err) or "No viable backend" in str(err):
            raise UnsupportedBackend(
                f"{opts.backend} has no kernel for this call: {str(err).splitlines()[0]}"
            ) from None
        raise
    return out, used


def _bottom_right_causal(vis: Visibility, T: int, S: int, window: int | None) -> bool:
    """The call's queries are the last T of keys 0 .. S-1 (a prefill chunk over a cache that holds every
    earlier token in order): query i sees keys 0 .. S - T + i, causal aligned to the bottom-right corner."""
    return vis.k_pos is None and window is None and not vis.all_visible and 1 < T < S and vis.q_start == S - T


def _lower_right_bias(T: int, S: int) -> CausalBias:
    """torch's `causal_lower_right(T, S)` (a CausalBias), imported at first use (see the imports above)."""
    from torch.nn.attention.bias import causal_lower_right

    return causal_lower_right(T, S)


_CAUSAL_BIAS_TAKES_GQA: bool | None = None  # whether torch's causal bias takes enable_gqa (read at first use)


def _causal_bias_takes_gqa() -> bool:
    """A torch whose causal bias takes no enable_gqa would drop it (read once, not per prefill chunk and layer)."""
    global _CAUSAL_BIAS_TAKES_GQA
    if _CAUSAL_BIAS_TAKES_GQA is None:
        from torch.nn.attention.bias import CausalBias

        _CAUSAL_BIAS_TAKES_GQA = "enable_gqa" in inspect.signature(CausalBias._dispatch).parameters
    return _CAUSAL_BIAS_TAKES_GQA


def _flash_runs_bottom_right(query: Tensor, key: Tensor, value: Tensor, gqa: bool) -> bool:
    """Whether CUDA's flash kernel takes this call with its causal flag, which it aligns bottom-right when the
    query is shorter than the keys (its CPU kernel aligns it top-left: there a mask is built as for the others)."""
    if query.device.type != "cuda" or (gqa and not _causal_bias_takes_gqa()):
        return False
    try:
        params = torch.backends.cuda.SDPAParams(query, key, value, None, 0.0, False, gqa)
    except TypeError:  # a torch whose SDPAParams has no enable_gqa
        return False
    return torch.backends.cuda.can_use_flash_attention(params)


_choice_memo: dict[tuple, str] = {}


def choose_backend(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, gqa: bool, backend: str
) -> str:
    """Ask PyTorch which kernel it would run (raising UnsupportedBackend with its reasons when none can).

    Memoised by the properties kernel selection depends on, so a decode step does not pay for it every call.
    """
    memo_key = (
        backend,
        q.device.type,
        q.dtype,
        q.shape[-1],
        gqa,
        is_causal,
        q.shape[2] == 1,
        None if mask is None else (mask.dtype, mask.dim()),
    )
    if memo_key in _choice_memo:
        return _choice_memo[memo_key]
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel(*kernel_order(backend)):
        warnings.simplefilter("always")
        try:
            chosen = torch._fused_sdp_choice(q, k, v, mask, 0.0, is_causal, scale=None, enable_gqa=gqa)
        except RuntimeError as err:
            reasons = "; ".join(str(w.message).strip() for w in caught) or str(err).splitlines()[0]
            phase = "causal prefill" if is_causal else "masked chunk" if mask is not None else "unmasked"
            raise UnsupportedBackend(
                f"{backend} has no kernel for this call ({phase}, {q.device.type}, {q.dtype}, gqa={gqa}): {reasons}"
            ) from None
    name = _SDP_NAME.get(SDPBackend(chosen), str(chosen)) if isinstance(chosen, int) else str(chosen)
    _choice_memo[memo_key] = name
    return name


def eager_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    vis: Visibility,
    opts: AttentionOptions,
    need_weights: bool = False,
    window: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Grouped attention over one key set. Returns (output (B, n_head, T, hs), summed weights (B, G, S) or None)."""
    out, weights = grouped_attention(query, [(key, value, vis)], opts, 0 if need_weights else None, window)
    return out, None if weights is None else weights[0]


def grouped_attention(
    query: Tensor,
    segments: list[tuple[Tensor, Tensor, Visibility]],
    opts: AttentionOptions,
    weights_from: int | None = None,
    window: int | None = None,
) -> tuple[Tensor, list[Tensor] | None]:
    """Eager grouped attention in query blocks over one or more key segments (say, a cache's buffer and the
    call's own new tokens), with one softmax over all of them. K/V are never expanded or concatenated; at most a
    (block, S) slice of scores per query head exists at a time.

    query (B, n_head, T, hs); each segment: key, value (B, G, S_i, hs) and the Visibility of its keys.
    weights_from: if set, also return, per segment, the softmax weights (B, G, S_i) in float32 summed over the
    queries t >= weights_from of this call and over the heads of each KV group.
    """
    B, n_head, T, hs = query.shape
    n_groups = segments[0][0].shape[1]
    q_per_kv = n_head // n_groups
    scale = opts.scale if opts.scale is not None else 1.0 / math.sqrt(hs)
    q5 = query.view(B, n_groups, q_per_kv, T, hs)  # (B, G, q_per_kv, T, hs)
    sizes = [k.shape[2] for k, _, _ in segments]
    out = torch.empty_like(q5)  # (B, G, q_per_kv, T, hs)
    weights = None
    if weights_from is not None:
        weights = torch.zeros(B, n_groups, sum(sizes), dtype=torch.float32, device=query.device)
    block = block_rows(query, sum(sizes), segments[0][2].q_start, opts.block_size)
    for t0 in range(0, T, block):
        t1 = min(T, t0 + block)
        tb = t1 - t0
        q_blk = q5[:, :, :, t0:t1].reshape(B, n_groups, q_per_kv * tb, hs)  # (B, G, q_per_kv * tb, hs)
        # one softmax over every segment's scores, each kept in its own tensor (no concatenated copy) and
        # normalised in place
        parts, limits = [], []
        for key, _, vis in segments:
            lim = vis.visible_prefix(t1, key.shape[2])  # keys after the block's last query are never visible
            limits.append(lim)
            if lim == 0:
                continue
            if lim < key.shape[2] and vis.k_pos is not None:
                vis = replace(vis, k_pos=vis.k_pos[..., :lim])
            scores = torch.matmul(q_blk, key[:, :, :lim].transpose(-1, -2)).float()  # (B, G, q_per_kv * tb, lim)
            scores.mul_(scale)
            if opts.softcap is not None:
                scores = torch.tanh(scores.div_(opts.softcap)).mul_(opts.softcap)
            scores = scores.view(B, n_groups, q_per_kv, tb, lim)  # (B, G, q_per_kv, tb, lim)
            mask = mask_rows(vis, t0, t1, lim, query.device, effective_window(vis.window, window))
            if mask is not None:  # built for this block alone: inverted in place
                mask = mask if mask.dim() == 2 else mask.unsqueeze(2)  # (tb, lim) or (B, G, 1, tb, lim)
                scores.masked_fill_(mask.logical_not_(), float("-inf"))
            parts.append(scores)
        top = parts[0].amax(dim=-1, keepdim=True)  # (B, G, q_per_kv, tb, 1): the row's largest score
        for probs in parts[1:]:
            top = torch.maximum(top, probs.amax(dim=-1, keepdim=True))
        total = None  # (B, G, q_per_kv, tb, 1): the softmax's denominator
        for probs in parts:
            partial = probs.sub_(top).exp_().sum(dim=-1, keepdim=True)
            total = partial if total is None else total.add_(partial)
        acc, seen = None, 0
        for (_, value, _), lim, offset in zip(segments, limits, _offsets(sizes)):
            if lim == 0:
                continue
            probs = parts[seen].div_(total)  # (B, G, q_per_kv, tb, lim)
            seen += 1
            if weights is not None and t1 > weights_from:
                rows = probs[:, :, :, max(0, weights_from - t0) :]  # the queries t >= weights_from
                weights[..., offset : offset + lim] += rows.sum(dim=(2, 3))
            p_seg = probs.to(query.dtype).view(B, n_groups, q_per_kv * tb, lim)
            o = torch.matmul(p_seg, value[:, :, :lim])  # (B, G, q_per_kv * tb, hs)
            acc = o if acc is None else acc.add_(o)
        del parts, probs
        out[:, :, :, t0:t1] = acc.view(B, n_groups, q_per_kv, tb, hs)
    if weights is not None:
        weights = list(weights.split(sizes, dim=-1))
    record("eager")
    return out.view(B, n_head, T, hs), weights


def kernel_order(backend: str) -> tuple[list[SDPBackend], bool]:
    """sdpa_kernel's arguments for an SDPA call: the forced kernel, or `_AUTO_PRIORITY` as the order."""
    if backend not in _SDP and backend != "auto":
        raise ValueError(f"SDPA runs its own kernels only; valid choices: auto, {', '.join(_SDP)} (got {backend!r})")
    return (_AUTO_PRIORITY, True) if backend == "auto" else ([_SDP[backend]], False)


def _offsets(sizes: list[int]) -> list[int]:
    """Where each segment starts in their concatenation."""
    return [sum(sizes[:i]) for i in range(len(sizes))]


def block_rows(query: Tensor, n_keys: int, q_start: int, most: int) -> int:
    """Query rows per block of the eager path, at most `most`: few enough that a block's float32 scores (every query
    head, every key) are no more elements than twice the call's own queries, or, for a chunk after the first, take
    at most half the bytes of the boolean mask a masked SDPA call over the same keys builds (T rows, or the rows of
    MASK_ELEMENTS when that is fewer), leaving room for the copies a block's softmax keeps alive. Neither grows
    with the position: a cache holding a fixed number of tokens keeps a fixed transient however long the context,
    and one holding a fraction of it stays within dense's (benchmarks/prefill_transient.py measures it)."""
    B, n_head, T, hs = query.shape
    sdpa_rows = min(T, MASK_ELEMENTS // n_keys)  # a masked SDPA call's rows per block over these keys
    rows = max(2 * T * hs // n_keys, sdpa_rows // (8 * B * n_head) if q_start > 0 else 0)
    return max(1, min(most, rows))
