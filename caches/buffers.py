"""Where a cache keeps its keys and values: full precision (`float`), or quantized to `int8` / `int4`.

Every cache policy stores K/V through one of these, so any policy runs on any buffer
(`cache=dense cache.buffer=int8`, `cache=h2o cache.buffer=int4`). All tensors of a buffer are shaped
(batch, n_query_groups, slots, X), and every write applies the same slot indexing to each of them.

Quantization: per token, per KV head and per group of `group_size` channels, asymmetric min-max to
2**bits - 1 levels, with the scale and the zero point (the group's minimum) stored in float16. int4 packs two
values per byte. Reading dequantizes into the cache's dtype; `size_estimate()` counts payload, scales and
zero points exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from model.attention import AttentionOptions
from model.decode_attention import static_decode_attention

BUFFERS = ("float", "int8", "int4", "kivi2", "kivi4")


class KVBuffer(nn.Module):
    """Full-precision K and V, (batch, n_query_groups, slots, head_size) each."""

    names: tuple[str, ...] = ("k", "v")
    quantized: bool = False  # stores codes and scales, not K and V (model/compiled_decode.py picks its kernel by it)
    # A fixed-shape decode step can read it (compiled, and captured in a CUDA graph): reading it does not touch the
    # whole buffer when a step needs a few slots
    compiled_reads: bool = True

    def __init__(self, batch: int, groups: int, slots: int, head_size: int, device, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.head_size = head_size
        for name, width, dt in self._layout():
            self.register_buffer(
                name, torch.zeros(batch, groups, slots, width, device=device, dtype=dt), persistent=False
            )

    @classmethod
    def layout(cls, head_size: int, dtype: torch.dtype) -> list[tuple[str, int, torch.dtype]]:
        """(name, last-dim width, dtype) of each stored tensor."""
        return [("k", head_size, dtype), ("v", head_size, dtype)]

    def _layout(self) -> list[tuple[str, int, torch.dtype]]:
        return self.layout(self.head_size, self.dtype)

    @classmethod
    def nbytes(cls, batch: int, groups: int, slots: int, head_size: int, dtype: torch.dtype) -> int:
        size = {dt: torch.empty((), dtype=dt).element_size() for _, _, dt in cls.layout(head_size, dtype)}
        return sum(batch * groups * slots * w * size[dt] for _, w, dt in cls.layout(head_size, dtype))

    def encode(self, key: Tensor, value: Tensor) -> dict[str, Tensor]:
        """(B, G, T, hs) K and V -> the stored tensors (B, G, T, X)."""
        return {"k": key, "v": value}

    def decode(self, stored: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return stored["k"], stored["v"]

    def error(self, key: Tensor, value: Tensor) -> Tensor:
        """(B, G, T): L2 norm of what storing K and V loses (zero at full precision)."""
        return torch.zeros(key.shape[:3], device=key.device, dtype=torch.float32)

    # ---- writes: the same indexing on every stored tensor ----------------------------------------------------

    def write_range(self, B: int, start: int, key: Tensor, value: Tensor) -> None:
        """Slots start .. start + T - 1 of every sequence and head."""
        T = key.shape[2]
        for name, x in self.encode(key, value).items():
            getattr(self, name)[:B, :, start : start + T] = x

    def write_slots(self, B: int, slots: Tensor, key: Tensor, value: Tensor) -> None:
        """Token t of the call goes to slot slots[t], the same for every sequence and head."""
        for name, x in self.encode(key, value).items():
            getattr(self, name)[:B].index_copy_(2, slots, x)

    def put(self, b: Tensor, g: Tensor, slot: Tensor, key_rows: Tensor, value_rows: Tensor) -> None:
        """Row i goes to (b[i], g[i], slot[i]); key_rows, value_rows (N, hs)."""
        encoded = self.encode(key_rows[None, None], value_rows[None, None])  # (1, 1, N, X) each
        for name, x in encoded.items():
            getattr(self, name)[b, g, slot] = x[0, 0]

    def write_at(self, B: int, slot: Tensor, key: Tensor, value: Tensor) -> None:
        """Token (b, g, t) goes to slot slot[b, g, t] of head g; slot (B, G, T), key and value (B, G, T, hs)."""
        for name, x in self.encode(key, value).items():  # x (B, G, T, X)
            getattr(self, name)[:B].scatter_(2, slot.unsqueeze(-1).expand(*slot.shape, x.shape[-1]), x)

    def put_where(self, B: int, slot: Tensor, keep: Tensor, key: Tensor, value: Tensor) -> None:
        """Token (b, g) of a one-token call goes to slot[b, g] where keep[b, g]; slot, keep (B, G, 1).

        An indexed write, not a scatter: a compiled step does it in place, where a scatter into the buffer would be
        compiled as a copy of the whole buffer, scattered into and copied back."""
        G = slot.shape[1]
        b = torch.arange(B, device=slot.device).view(B, 1, 1)  # (B, 1, 1)
        g = torch.arange(G, device=slot.device).view(1, G, 1)  # (1, G, 1)
        for name, x in self.encode(key, value).items():  # x (B, G, 1, X)
            stored = getattr(self, name)
            stored.index_put_((b, g, slot), torch.where(keep.unsqueeze(-1), x, stored[b, g, slot]))

    def move_slot(self, B: int, src: int, dst: Tensor) -> None:
        """Slot `src` of every sequence and head copied to slot dst[b, g] (dst (B, G, 1); src itself allowed)."""
        for name in self.names:
            stored = getattr(self, name)[:B]  # (B, G, slots, X)
            row = stored[:, :, src : src + 1].clone()  # (B, G, 1, X): a copy, the scatter may overwrite its source
            stored.scatter_(2, dst.unsqueeze(-1).expand(-1, -1, -1, stored.shape[-1]), row)

    def reset(self) -> None:
        """A new sequence begins (a prefill): a buffer that tracks what it was written forgets it."""

    def read(self, B: int, n: int) -> tuple[Tensor, Tensor]:
        """K and V of slots 0 .. n-1, (B, G, n, hs) in the cache's dtype (views at full precision)."""
        return self.decode({name: getattr(self, name)[:B, :, :n] for name in self.names})

    def attend_all(self, query: Tensor, B: int, n_valid: Tensor, opts: AttentionOptions) -> Tensor:
        """A fixed-shape decode step's attention (query (B, n_head, 1, hs)) over every slot of the buffer, the
        first `n_valid` filled (`static_decode_attention`). Returns (B, 1, n_head * hs)."""
        k, v = self.read(B, getattr(self, self.names[0]).shape[2])  # (B, G, slots, hs)
        return static_decode_attention(query, k, v, n_valid, opts)


class QuantizedKVBuffer(KVBuffer):
    bits: int = 8
    quantized = True
    names = ("k_q", "k_scale", "k_zero", "v_q", "v_scale", "v_zero")

    def __init__(self, batch, groups, slots, head_size, device, dtype, group_size: int = 32) -> None:
        if head_size % group_size:
            raise ValueError(f"group_size={group_size} must divide head_size={head_size}")
        self.group_size = group_size
        super().__init__(batch, groups, slots, head_size, device, dtype)

    @classmethod
    def layout(cls, head_size: int, dtype: torch.dtype, group_size: int = 32) -> list:
        payload = head_size * cls.bits // 8
        n_groups = head_size // group_size
        parts = [("q", payload, torch.uint8), ("scale", n_groups, torch.float16), ("zero", n_groups, torch.float16)]
        return [(f"{p}_{part}", width, dt) for p in "kv" for part, width, dt in parts]

    def _layout(self) -> list:
        return self.layout(self.head_size, self.dtype, self.group_size)

    @classmethod
    def nbytes(cls, batch, groups, slots, head_size, dtype, group_size: int = 32) -> int:
        size = {torch.uint8: 1, torch.float16: 2}
        return sum(batch * groups * slots * w * size[dt] for _, w, dt in cls.layout(head_size, dtype, group_size))

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., hs) -> payload (..., hs * bits / 8) uint8, scale and zero (..., hs / group_size) float16."""
        levels = 2**self.bits - 1
        grouped = x.float().unflatten(-1, (-1, self.group_size))  # (..., n_groups, group_size)
        lo = grouped.amin(dim=-1, keepdim=True)
        hi = grouped.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / levels).to(torch.float16)
        zero = lo.to(torch.float16)
        # quantize against the float16-rounded scale and zero, so that decode inverts exactly what is stored
        safe = scale.float().clamp_min(torch.finfo(torch.float16).tiny)
        q = ((grouped - zero.float()) / safe).round_().clamp_(0, levels).to(torch.uint8).flatten(-2)  # (..., hs)
        return self._pack(q), scale.squeeze(-1), zero.squeeze(-1)

    def _dequantize(self, payload: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        q = self._unpack(payload).float().unflatten(-1, (-1, self.group_size))  # (..., n_groups, group_size)
        x = q * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
        return x.flatten(-2).to(self.dtype)  # (..., hs)

    def _pack(self, q: Tensor) -> Tensor:
        return q

    def _unpack(self, payload: Tensor) -> Tensor:
        return payload

    def encode(self, key: Tensor, value: Tensor) -> dict[str, Tensor]:
        out = {}
        for p, x in (("k", key), ("v", value)):
            out[f"{p}_q"], out[f"{p}_scale"], out[f"{p}_zero"] = self._quantize(x)
        return out

    def decode(self, stored: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return tuple(self._dequantize(stored[f"{p}_q"], stored[f"{p}_scale"], stored[f"{p}_zero"]) for p in "kv")

    def attend_all(self, query: Tensor, B: int, n_valid: Tensor, opts: AttentionOptions) -> Tensor:
        """As KVBuffer's, but in the Triton form the kernel reads the codes, scales and zeros and dequantizes tile
        by tile (1 byte per value at int8, not the 2 of a dequantized copy written and read again); the SDPA forms
        attend a dequantized copy of the whole buffer."""
        if opts.decode_form != "triton":
            return super().attend_all(query, B, n_valid, opts)
        from model import triton_decode

        stored = {name: getattr(self, name)[:B] for name in self.names}
        scales = {n: stored[n] for n in ("k_scale", "k_zero", "v_scale", "v_zero")}
        quantized = {"bits": self.bits, "group_size": self.group_size, **scales}
        return triton_decode.decode_attention(
            query, stored["k_q"], stored["v_q"], n_valid, opts.scale, opts.launch, quantized=quantized
        )

    def error(self, key: Tensor, value: Tensor) -> Tensor:
        k, v = self.decode(self.encode(key, value))
        return (k.float() - key.float()).norm(dim=-1) + (v.float() - value.float()).norm(dim=-1)  # (B, G, T)


class Int8KVBuffer(QuantizedKVBuffer):
    bits = 8


class Int4KVBuffer(QuantizedKVBuffer):
    """Two 4-bit values per byte: channel 2i in the low nibble, 2i + 1 in the high one."""

    bits = 4

    def _pack(self, q: Tensor) -> Tensor:
        return q[..., 0::2] | (q[..., 1::2] << 4)

    def _unpack(self, payload: Tensor) -> Tensor:
        low, high = payload & 0x0F, payload >> 4
        return torch.stack([low, high], dim=-1).flatten(-2)  # (..., hs)


_BUFFER_CLASSES = {"float": KVBuffer, "int8": Int8KVBuffer, "int4": Int4KVBuffer}


def buffer_class(name: str) -> type[KVBuffer]:
    if name not in BUFFERS:
        raise ValueError(f"unknown buffer {name!r}; valid choices: {', '.join(BUFFERS)}")
    if name.startswith("kivi"):  # caches/kivi.py builds on this module
        from caches.kivi import Kivi2KVBuffer, Kivi4KVBuffer

        return {"kivi2": Kivi2KVBuffer, "kivi4": Kivi4KVBuffer}[name]
    return _BUFFER_CLASSES[name]


def make_buffer(params, buffer: str = "float", group_size: int = 32) -> KVBuffer:
    """A buffer of params.cache_length slots per sequence and KV head."""
    cls = buffer_class(buffer)
    args = (params.batch_size, params.n_query_groups, params.cache_length, params.head_size, params.device)
    return cls(*args, params.dtype) if cls is KVBuffer else cls(*args, params.dtype, group_size=group_size)


def buffer_nbytes(params, buffer: str = "float", group_size: int = 32) -> int:
    cls = buffer_class(buffer)
    args = (params.batch_size, params.n_query_groups, params.cache_length, params.head_size, params.dtype)
    return cls.nbytes(*args) if cls is KVBuffer else cls.nbytes(*args, group_size=group_size)
