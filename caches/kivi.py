"""`kivi2` / `kivi4`: KIVI's asymmetric quantization (Liu et al., 2024), a buffer any cache runs on
(`cache.buffer=kivi2`). Keys are quantized per channel over groups of `group_size` slots (a key channel's outliers
stay within their channel), values per token over groups of `group_size` channels; 2 or 4 bits, min-max, scales
and zero points in float16. The slots of the group being filled (the residual: the newest tokens of an appending
cache) stay in full precision until the group's last slot is written, then the group is quantized. A write into
a quantized group (an evicted slot refilled, a ring wrapping round) quantizes that group again with its new row.

Bytes per token and KV head: 2 x head_size x bits / 8 of codes, 2 x 2 x head_size / group_size of key scales and
zeros (one pair per channel per group of slots) and 2 x 2 x head_size / group_size of value ones (per token, per
group of channels), plus one group of residual slots in full precision per sequence and KV head. At 2 bits and
head size 64 that is 48 bytes against 256 for a bf16 cache (0.19x), at 4 bits 80 (0.31x).

Runs eagerly: reads dequantize the whole buffer, so the compiled decode step refuses it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from caches.buffers import KVBuffer


def _pack(q: Tensor, bits: int) -> Tensor:
    """Codes (..., hs) in [0, 2**bits) -> bytes (..., hs * bits / 8): value j of a byte in bits [j * bits, ...)."""
    per = 8 // bits
    q = q.unflatten(-1, (-1, per))  # (..., hs / per, per)
    out = q[..., 0].clone()
    for j in range(1, per):
        out |= q[..., j] << (j * bits)
    return out


def _unpack(payload: Tensor, bits: int) -> Tensor:
    per, mask = 8 // bits, 2**bits - 1
    return torch.stack([(payload >> (j * bits)) & mask for j in range(per)], dim=-1).flatten(-2)  # (..., hs)


class KiviKVBuffer(KVBuffer):
    bits: int = 2
    quantized = True
    compiled_reads = False  # its reads dequantize the whole buffer
    names = ("k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero", "k_res", "v_res")

    def __init__(self, batch, groups, slots, head_size, device, dtype, group_size: int = 32) -> None:
        if head_size % group_size:
            raise ValueError(f"group_size={group_size} must divide head_size={head_size}")
        torch.nn.Module.__init__(self)
        self.dtype, self.head_size, self.group_size, self.slots = dtype, head_size, group_size, slots
        for name, shape, dt in self.layout(head_size, dtype, group_size, slots):
            self.register_buffer(name, torch.zeros(batch, groups, *shape, device=device, dtype=dt), persistent=False)
        self.reset()

    def reset(self) -> None:
        """A new sequence: nothing written; the first group is the residual."""
        self.written = [False] * self.slots  # per slot, since the last reset
        self.res_group: int | None = None  # the group whose rows are in k_res, v_res (not yet complete)

    @classmethod
    def layout(cls, head_size: int, dtype: torch.dtype, group_size: int = 32, slots: int = 1) -> list:
        """(name, shape after (batch, KV heads), dtype). Codes are padded to whole groups of slots; keys have a
        scale and zero per group of slots and channel, values per slot and group of channels."""
        payload, per_token = head_size * cls.bits // 8, head_size // group_size
        groups = -(-slots // group_size)
        padded = groups * group_size
        return [
            ("k_q", (padded, payload), torch.uint8),
            ("k_scale", (groups, head_size), torch.float16),
            ("k_zero", (groups, head_size), torch.float16),
            ("v_q", (padded, payload), torch.uint8),
            ("v_scale", (padded, per_token), torch.float16),
            ("v_zero", (padded, per_token), torch.float16),
            ("k_res", (group_size, head_size), dtype),
            ("v_res", (group_size, head_size), dtype),
        ]

    @classmethod
    def nbytes(cls, batch, groups, slots, head_size, dtype, group_size: int = 32) -> int:
        total = 0
        for _, shape, dt in cls.layout(head_size, dtype, group_size, slots):
            total += batch * groups * shape[0] * shape[1] * torch.empty((), dtype=dt).element_size()
        return total

    # ---- quantizers ------------------------------------------------------------------------------------------

    def _minmax(self, x: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
        """Codes of x quantized over `dim` (min-max, 2**bits levels), and the float16 scale and zero (dim kept)."""
        levels = 2**self.bits - 1
        x = x.float()
        lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
        scale, zero = ((hi - lo) / levels).to(torch.float16), lo.to(torch.float16)
        safe = scale.float().clamp_min(torch.finfo(torch.float16).tiny)  # against the rounded scale and zero
        codes = ((x - zero.float()) / safe).round_().clamp_(0, levels).to(torch.uint8)
        return codes, scale, zero

    def _quantize_keys(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """rows (..., group_size, hs) -> codes (..., group_size, payload), scale and zero (..., hs): per channel."""
        codes, scale, zero = self._minmax(rows, dim=-2)
        return _pack(codes, self.bits), scale.squeeze(-2), zero.squeeze(-2)

    def _quantize_values(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """rows (..., hs) -> codes (..., payload), scale and zero (..., hs / group_size): per token, channel group."""
        codes, scale, zero = self._minmax(rows.unflatten(-1, (-1, self.group_size)), dim=-1)
        return _pack(codes.flatten(-2), self.bits), scale.squeeze(-1), zero.squeeze(-1)

    def _keys(self, codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """codes (..., S, payload) of whole groups, scale and zero (..., S / group_size, hs) -> (..., S, hs)."""
        x = _unpack(codes, self.bits).float().unflatten(-2, (-1, self.group_size))  # (..., groups, group_size, hs)
        return (x * scale.float().unsqueeze(-2) + zero.float().unsqueeze(-2)).flatten(-3, -2).to(self.dtype)

    def _values(self, codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        x = _unpack(codes, self.bits).float().unflatten(-1, (-1, self.group_size))  # (..., groups, group_size)
        return (x * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).flatten(-2).to(self.dtype)

    # ---- writes and reads --------------------------------------------------------------------------------------

    def _group(self, B: int, j: int) -> tuple[Tensor, Tensor]:
        """K and V of slot group j, (B, G, group_size, hs), in the cache's dtype (the residual's own rows)."""
        gs = self.group_size
        if j == self.res_group:
            return self.k_res[:B], self.v_res[:B]
        rows = slice(j * gs, (j + 1) * gs)
        k = self._keys(self.k_q[:B, :, rows], self.k_scale[:B, :, j : j + 1], self.k_zero[:B, :, j : j + 1])
        v = self._values(self.v_q[:B, :, rows], self.v_scale[:B, :, rows], self.v_zero[:B, :, rows])
        return k, v

    def _store_group(self, B: int, j: int, k: Tensor, v: Tensor) -> None:
        """Quantize slot group j's K and V (B, G, group_size, hs) into the codes."""
        gs = self.group_size
        rows = slice(j * gs, (j + 1) * gs)
        self.k_q[:B, :, rows], self.k_scale[:B, :, j], self.k_zero[:B, :, j] = self._quantize_keys(k)
        self.v_q[:B, :, rows], self.v_scale[:B, :, rows], self.v_zero[:B, :, rows] = self._quantize_values(v)

    def _complete(self, j: int) -> bool:
        gs = self.group_size
        return all(self.written[j * gs : min((j + 1) * gs, self.slots)])

    def _update(self, B: int, j: int, edit) -> None:
        """Group j's K and V (dequantized, or the residual's), edited in place by `edit(k, v)`, then stored: in
        full precision while the group has unwritten slots, quantized once it has none."""
        gs = self.group_size
        k, v = (x.clone() for x in self._group(B, j))
        edit(k, v)
        if not self._complete(j):
            if self.res_group not in (None, j):
                raise ValueError("a kivi buffer holds one group in full precision: slots must be filled in order")
            self.res_group = j
            self.k_res[:B], self.v_res[:B] = k, v
            return
        if self.res_group == j:
            self.res_group = None
        end = min((j + 1) * gs, self.slots) - j * gs
        if end < gs:  # the short last group: its padding rows repeat a real one (no spurious range)
            k[:, :, end:], v[:, :, end:] = k[:, :, :1], v[:, :, :1]
        self._store_group(B, j, k, v)

    def write_range(self, B: int, start: int, key: Tensor, value: Tensor) -> None:
        """Slots start .. start + T - 1 of every sequence and head."""
        gs, T = self.group_size, key.shape[2]
        for j in range(start // gs, (start + T - 1) // gs + 1):
            lo, hi = max(start, j * gs), min(start + T, (j + 1) * gs)  # slots of group j in this call
            self.written[lo:hi] = [True] * (hi - lo)

            def edit(k, v, lo=lo - j * gs, hi=hi - j * gs, src=lo - start):
                k[:, :, lo:hi] = key[:, :, src : src + hi - lo]
                v[:, :, lo:hi] = value[:, :, src : src + hi - lo]

            self._update(B, j, edit)

    def write_slots(self, B: int, slots: Tensor, key: Tensor, value: Tensor) -> None:
        for t, slot in enumerate(slots.tolist()):
            self.write_range(B, slot, key[:, :, t : t + 1], value[:, :, t : t + 1])

    def put(self, b: Tensor, g: Tensor, slot: Tensor, key_rows: Tensor, value_rows: Tensor) -> None:
        """Row i goes to (b[i], g[i], slot[i]); each group written is quantized again."""
        gs = self.group_size
        B = int(b.max()) + 1
        for j in sorted(set((slot // gs).tolist())):
            sel = (slot // gs) == j
            for s in slot[sel].tolist():
                self.written[s] = True

            def edit(k, v, sel=sel, j=j):
                k[b[sel], g[sel], slot[sel] - j * gs] = key_rows[sel].to(k.dtype)
                v[b[sel], g[sel], slot[sel] - j * gs] = value_rows[sel].to(v.dtype)

            self._update(B, j, edit)

    def put_where(self, B: int, slot: Tensor, keep: Tensor, key: Tensor, value: Tensor) -> None:
        """Token (b, g) of a one-token call goes to slot[b, g] where keep[b, g] (eager: the compiled decode step
        refuses this buffer)."""
        bb, gg = torch.nonzero(keep[..., 0], as_tuple=True)
        if len(bb):
            self.put(bb, gg, slot[bb, gg, 0], key[bb, gg, 0], value[bb, gg, 0])

    def read(self, B: int, n: int) -> tuple[Tensor, Tensor]:
        """K and V of slots 0 .. n-1, (B, G, n, hs), dequantized, the residual's rows as they are."""
        gs = self.group_size
        whole = -(-n // gs)  # groups to read
        k = self._keys(self.k_q[:B, :, : whole * gs], self.k_scale[:B, :, :whole], self.k_zero[:B, :, :whole])
        v = self._values(
            self.v_q[:B, :, : whole * gs], self.v_scale[:B, :, : whole * gs], self.v_zero[:B, :, : whole * gs]
        )
        if self.res_group is not None and self.res_group < whole:  # its rows in full precision
            rows = slice(self.res_group * gs, (self.res_group + 1) * gs)
            k[:, :, rows], v[:, :, rows] = self.k_res[:B], self.v_res[:B]
        return k[:, :, :n], v[:, :, :n]

    def attend_all(self, query, B, n_valid, opts):
        raise NotImplementedError("a kivi buffer runs eagerly: its reads dequantize the whole buffer")

    def error(self, key: Tensor, value: Tensor) -> Tensor:
        """(B, G, T): what quantizing the values loses (the keys' share depends on their group: not counted)."""
        codes, scale, zero = self._quantize_values(value)
        return (self._values(codes, scale, zero).float() - value.float()).norm(dim=-1)


class Kivi2KVBuffer(KiviKVBuffer):
    bits = 2


class Kivi4KVBuffer(KiviKVBuffer):
    bits = 4
