"""Grouped-query decode attention as a split-K Triton kernel: one query per sequence over the filled slots of a
fixed-size K/V buffer, each KV head's keys and values read once for all the query heads of its group.

Decode attention reads the whole cache to produce one row per head, so it is memory-bound, and at batch 1-4 the
batch x KV heads alone (8-32 for Llama-3.2-1B) are far too few programs to keep an H100/H200's 132 SMs reading.
The filled slots are therefore split among SPLITS programs per (sequence, KV head) ("flash-decoding"): each
computes a softmax-weighted partial output and the log-sum-exp of its share, and a small merge weighs the
partials by those. The query heads of a group are the rows of one tile (padded to 16, what `tl.dot` needs), so
K and V are never expanded. n_valid is read on the device: the same compiled kernel (and CUDA graph) serves
every step. On the CPU the kernel runs under Triton's interpreter (TRITON_INTERPRET=1), which the tests use.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with CUDA builds of torch; on the CPU it is only needed for the interpreter
    triton = tl = None

OPTIONS = ("BLOCK_N", "num_stages", "num_warps", "SPLIT_KV")  # the launch options (resolve_options)


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernel cannot run on `device` here (None: it can)."""
    if triton is None:
        return "Triton is not installed (it comes with CUDA builds of torch; pip install triton for the CPU)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"Triton kernels run on CUDA, or on the CPU under its interpreter (TRITON_INTERPRET=1); got {device}"
    return None


if triton is not None:

    @triton.jit
    def _load_tile(
        base,
        scale_base,
        zero_base,
        idx,
        inside,
        stride_s,
        stride_qs,
        HS: tl.constexpr,
        BITS: tl.constexpr,
        GS: tl.constexpr,
        DTYPE: tl.constexpr,
    ):
        """Rows `idx` of one KV head's K or V, (BLOCK_N, HS) in DTYPE: stored as is (BITS 0), or dequantized from
        8- or 4-bit codes (4-bit: channel 2i in the low nibble of byte i, 2i + 1 in the high one) as code * scale
        + zero, per group of GS channels with float16 scale and zero, as caches/buffers.py stores them. Every load
        is a contiguous row segment (vector loads); nibbles and group scales are spread in registers."""
        BLOCK_N: tl.constexpr = idx.shape[0]
        if BITS == 0:
            dims = tl.arange(0, HS)
            tile = tl.load(base + idx[:, None] * stride_s + dims[None, :], mask=inside[:, None], other=0.0)
        else:
            if BITS == 8:
                dims = tl.arange(0, HS)
                code = tl.load(base + idx[:, None] * stride_s + dims[None, :], mask=inside[:, None], other=0)
            else:
                half = tl.arange(0, HS // 2)
                byte = tl.load(base + idx[:, None] * stride_s + half[None, :], mask=inside[:, None], other=0)
                code = tl.reshape(tl.join(byte & 0xF, byte >> 4), (BLOCK_N, HS))  # (BLOCK_N, HS // 2, 2) -> rows
            groups = tl.arange(0, HS // GS)
            scale = tl.load(scale_base + idx[:, None] * stride_qs + groups[None, :], mask=inside[:, None], other=0.0)
            zero = tl.load(zero_base + idx[:, None] * stride_qs + groups[None, :], mask=inside[:, None], other=0.0)
            grouped = tl.reshape(code.to(tl.float32), (BLOCK_N, HS // GS, GS))  # (BLOCK_N, groups, GS)
            grouped = grouped * scale.to(tl.float32)[:, :, None] + zero.to(tl.float32)[:, :, None]
            tile = tl.reshape(grouped, (BLOCK_N, HS))
        return tile.to(DTYPE)

    @triton.jit
    def _split_kernel(
        Q,
        K,
        V,
        K_SCALE,
        K_ZERO,
        V_SCALE,
        V_ZERO,
        N_VALID,
        OUT,
        LSE,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kg,
        stride_ks,
        stride_vb,
        stride_vg,
        stride_vs,
        stride_qsb,
        stride_qsg,
        stride_qss,
        stride_ob,
        stride_og,
        stride_os,
        stride_om,
        stride_lb,
        stride_lg,
        stride_ls,
        scale_log2: tl.constexpr,
        G: tl.constexpr,
        QPK: tl.constexpr,
        HS: tl.constexpr,
        SPLITS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        IEEE: tl.constexpr,
        BITS: tl.constexpr,
        GS: tl.constexpr,
    ):
        """Program (b * G + g, split): query heads g * QPK .. of sequence b against its share of slots
        [lo, hi) of KV head g. Writes the normalised partial output (QPK, HS) and its log2-sum-exp (QPK,).
        BITS 8 or 4: K and V are codes, with scales and zeros (B, G, S, HS / GS) at K_SCALE .. V_ZERO, which
        share strides; BITS 0: K and V are the values, and the four scale pointers are not read."""
        bg = tl.program_id(0)
        split = tl.program_id(1)
        b = (bg // G).to(tl.int64)  # 64-bit offsets: a batch of long buffers passes 2**31 elements
        g = bg % G
        n_valid = tl.load(N_VALID).to(tl.int32)
        share = tl.cdiv(tl.cdiv(n_valid, SPLITS), BLOCK_N) * BLOCK_N  # slots per split, whole blocks
        lo = split * share
        hi = tl.minimum(lo + share, n_valid)
        rows = tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HS)
        cols = tl.arange(0, BLOCK_N)
        q = tl.load(
            Q + b * stride_qb + (g * QPK + rows)[:, None] * stride_qh + dims[None, :],
            mask=rows[:, None] < QPK,
            other=0.0,
        )  # (BLOCK_M, HS)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the log2-scaled scores
        s_sum = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m)
        acc = tl.zeros([BLOCK_M, HS], tl.float32)
        k_base = K + b * stride_kb + g * stride_kg
        v_base = V + b * stride_vb + g * stride_vg
        quant = b * stride_qsb + g * stride_qsg  # offset of this KV head's scales and zeros
        for start in range(lo, hi, BLOCK_N):
            idx = start + cols
            inside = idx < hi
            k = _load_tile(
                k_base,
                K_SCALE + quant,
                K_ZERO + quant,
                idx,
                inside,
                stride_ks,
                stride_qss,
                HS,
                BITS,
                GS,
                Q.dtype.element_ty,
            )  # (BLOCK_N, HS)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(inside[None, :], s * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(s - m_new[:, None])
            s_sum = s_sum * alpha + tl.sum(p, 1)
            v = _load_tile(
                v_base,
                V_SCALE + quant,
                V_ZERO + quant,
                idx,
                inside,
                stride_vs,
                stride_qss,
                HS,
                BITS,
                GS,
                Q.dtype.element_ty,
            )  # (BLOCK_N, HS)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        # a split left without slots (n_valid small): output 0 and log-sum-exp -inf, weight 0 in the merge
        out = acc / tl.where(s_sum > 0, s_sum, 1.0)[:, None]
        lse = tl.where(s_sum > 0, m + tl.log2(tl.where(s_sum > 0, s_sum, 1.0)), float("-inf"))
        out_ptrs = OUT + b * stride_ob + g * stride_og + split * stride_os + rows[:, None] * stride_om + dims[None, :]
        tl.store(out_ptrs, out, mask=rows[:, None] < QPK)
        tl.store(LSE + b * stride_lb + g * stride_lg + split * stride_ls + rows, lse, mask=rows < QPK)


_SM_COUNT: dict[int, int] = {}


def default_splits(batch: int, groups: int, slots: int, block_n: int, device: torch.device) -> int:
    """About four programs per SM on CUDA (4 splits on the CPU, to exercise the merge), and no fewer than two
    blocks of slots per split. Why four (a reasoned default, not yet measured against others): a program keeps
    two K and V tiles in flight (num_stages=3: 32 KB at BLOCK_N=64, head size 64, bf16), and an H100/H200 SM
    needs roughly 20-30 KB in flight to cover the memory latency at full bandwidth; several programs per SM
    also even out the ends of their loops. `SPLIT_KV` overrides it."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SM_COUNT:
            _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
        wanted = -(-4 * _SM_COUNT[index] // (batch * groups))
    else:
        wanted = 4
    return max(1, min(wanted, slots // (2 * block_n)))


def resolve_options(batch: int, groups: int, slots: int, device: torch.device, options: dict | None) -> dict:
    """Every launch option, the ones not given at their defaults: BLOCK_N 64 (slots per tile), SPLIT_KV
    (`default_splits`), num_warps 4, num_stages 3. Resolved once outside a compiled step, so that tracing it
    does not query the device."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown Triton decode option {unknown[0]!r}; valid: {', '.join(OPTIONS)}")
    resolved = {
        "BLOCK_N": options.get("BLOCK_N") or 64,
        "num_warps": options.get("num_warps") or 4,
        "num_stages": options.get("num_stages") or 3,
    }
    resolved["SPLIT_KV"] = options.get("SPLIT_KV") or default_splits(batch, groups, slots, resolved["BLOCK_N"], device)
    return resolved


if triton is not None:
    # The schema spelled out: no inference from annotations (which this module's `from __future__ import
    # annotations` turns into strings, and which older torch versions did not resolve).
    @torch.library.custom_op(
        "kvbench::triton_decode_split",
        mutates_args=(),
        schema="(Tensor query, Tensor key, Tensor value, Tensor k_scale, Tensor k_zero, Tensor v_scale, "
        "Tensor v_zero, Tensor n_valid, float scale, int bits, int group_size, int block_n, int splits, "
        "int num_warps, int num_stages) -> (Tensor, Tensor)",
    )
    def _split(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        k_scale: Tensor,
        k_zero: Tensor,
        v_scale: Tensor,
        v_zero: Tensor,
        n_valid: Tensor,
        scale: float,
        bits: int,
        group_size: int,
        block_n: int,
        splits: int,
        num_warps: int,
        num_stages: int,
    ) -> tuple[Tensor, Tensor]:
        """The split kernel as an opaque op for torch.compile (it reads its inputs, writes only its outputs):
        (partial outputs (B, G, SPLITS, QPK, hs) float32, their log2-sum-exp (B, G, SPLITS, QPK))."""
        B, H, _, hs = query.shape
        G = key.shape[1]
        qpk = H // G
        q = query.view(B, H, hs)  # (B, n_head, hs): T = 1
        partial = torch.empty(B, G, splits, qpk, hs, dtype=torch.float32, device=query.device)
        lse = torch.empty(B, G, splits, qpk, dtype=torch.float32, device=query.device)
        _split_kernel[(B * G, splits)](
            q,
            key,
            value,
            k_scale,
            k_zero,
            v_scale,
            v_zero,
            n_valid,
            partial,
            lse,
            q.stride(0),
            q.stride(1),
            key.stride(0),
            key.stride(1),
            key.stride(2),
            value.stride(0),
            value.stride(1),
            value.stride(2),
            k_scale.stride(0),
            k_scale.stride(1),
            k_scale.stride(2),
            partial.stride(0),
            partial.stride(1),
            partial.stride(2),
            partial.stride(3),
            lse.stride(0),
            lse.stride(1),
            lse.stride(2),
            scale_log2=scale * math.log2(math.e),
            G=G,
            QPK=qpk,
            HS=hs,
            SPLITS=splits,
            BLOCK_M=max(16, triton.next_power_of_2(qpk)),
            BLOCK_N=block_n,
            IEEE=query.dtype == torch.float32,
            BITS=bits,
            GS=group_size,
            num_warps=num_warps,
            num_stages=num_stages,
        )
        return partial, lse

    @_split.register_fake
    def _(
        query,
        key,
        value,
        k_scale,
        k_zero,
        v_scale,
        v_zero,
        n_valid,
        scale,
        bits,
        group_size,
        block_n,
        splits,
        num_warps,
        num_stages,
    ):
        B, H, _, hs = query.shape
        G = key.shape[1]
        partial = query.new_empty(B, G, splits, H // G, hs, dtype=torch.float32)
        return partial, query.new_empty(B, G, splits, H // G, dtype=torch.float32)


def decode_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    n_valid: Tensor,
    scale: float | None = None,
    options: dict | None = None,
    quantized: dict | None = None,
) -> Tensor:
    """query (B, n_head, 1, hs); key, value (B, G, S, hs), last dimension contiguous; n_valid a 0-d int64 tensor:
    slots 0 .. n_valid - 1 are attended. Returns (B, 1, n_head * hs), heads in order. options: see
    `resolve_options` (a compiled step passes them resolved). quantized: K and V are 8- or 4-bit codes
    (B, G, S, hs * bits / 8) uint8, dequantized tile by tile inside the kernel (never as a whole buffer), given
    {"bits", "group_size", "k_scale", "k_zero", "v_scale", "v_zero"} (scales and zeros (B, G, S, hs / group_size)
    float16, one layout for all four: caches/buffers.py)."""
    B, H, T, hs = query.shape
    G, S = key.shape[1], key.shape[2]
    if T != 1:
        raise ValueError(f"the Triton decode kernel takes one query per sequence, got T={T}")
    if hs & (hs - 1):
        raise ValueError(f"the Triton decode kernel needs a power-of-two head size, got {hs}")
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("the Triton decode kernel needs the head dimension contiguous")
    if options is None or set(options) != set(OPTIONS):
        options = resolve_options(B, G, S, query.device, options)
    scale = scale if scale is not None else 1.0 / math.sqrt(hs)
    if quantized is None:
        bits, group_size, extras = 0, hs, (key, key, key, key)  # the scale pointers go unread
    else:
        bits, group_size = quantized["bits"], quantized["group_size"]
        if bits not in (8, 4) or hs % group_size or group_size & (group_size - 1):
            raise ValueError(
                f"quantized K/V need bits 8 or 4 and a power-of-two group size dividing {hs}; got "
                f"bits={bits}, group_size={group_size}"
            )
        extras = tuple(quantized[name] for name in ("k_scale", "k_zero", "v_scale", "v_zero"))
        if len({t.stride() for t in extras}) != 1:
            raise ValueError("quantized K/V: scales and zeros must share one layout")
    partial, lse = _split(
        query,
        key,
        value,
        *extras,
        n_valid,
        scale,
        bits,
        group_size,
        options["BLOCK_N"],
        options["SPLIT_KV"],
        options["num_warps"],
        options["num_stages"],
    )
    weights = torch.softmax(lse * math.log(2), dim=2)  # (B, G, SPLITS, QPK): each split's share of the softmax
    out = (partial * weights.unsqueeze(-1)).sum(2)  # (B, G, QPK, hs)
    return out.to(query.dtype).reshape(B, 1, H * hs)  # (B, 1, n_head * hs), head h = g * QPK + row
