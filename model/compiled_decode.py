"""A decode step compiled with fixed shapes and, on CUDA, replayed from a CUDA graph.

Decode is memory-bound: a step must read the weights and the K/V once, and at batch 1-4 an eager step spends
more time launching ~15 kernels per layer than reading memory. Compiled and captured, the step is a handful of
fused kernels replayed with one launch.

    model.set_kv_caches(batch, "dense", cache_length)
    decoder = CompiledDecode(model)                          # compile=True
    token = model(prompt, input_pos=0)[:, -1:].argmax(-1)   # prefill as always: eager, chunked
    logits = decoder(token, input_pos=T)                     # the int API, checked here, outside the graph

A captured graph replays with the same arguments, so the position cannot be a new Python int each step. It is a
0-d tensor on the device (`pos`) that the step advances itself; the int stays the API: every call checks it
against the caches (`check_position`) and only writes it to the device when it is not the one the step left
there (after a new prefill, say), which costs no host synchronisation. Each cache's `decode_step` writes the new
K/V at `pos` and attends its buffer through one of the forms of model/decode_attention.py.

`plan()` decides everything once, in one place, and refuses what cannot run with `UnsupportedBackend` (the harness
writes it as an `unsupported` row):

* form: the grouped step of the score-based caches that read weights at decode; else the Triton kernel for an
  int8/int4 buffer on CUDA (sdpa=auto), `sdpa_gqa` on CUDA, the grouped-rows `sdpa` form elsewhere;
* graphs (CUDA, compiled): one CUDA graph of our own (`manual`), replayed with nothing in between, where the step
  is idempotent at a position; the score-based caches' step scores and evicts (`idempotent_decode` False, whatever
  its form), so it cannot run twice at one position and is captured by torch.compile's graph trees (`trees`,
  mode="reduce-overhead") instead.

The score-based caches whose policy reads no weights at decode (caches/scored.py, `decode_weights`) take the SDPA
forms like dense. A hybrid model's window caches decode through SDPA too: with a cache of the grouped step in its
global layers the step would need both forms, which `plan` refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from model.attention import UnsupportedBackend, record
from model.decode_attention import FORMS, WEIGHTED, decode_kernel


@dataclass(frozen=True)
class DecodePlan:
    form: str  # sdpa | sdpa_gqa | triton | grouped (model/decode_attention.py)
    graphs: str | None  # manual | trees on CUDA when compiled; None: no CUDA graph
    kernel: str  # what the attention runs: grouped, triton:<options>, sdpa:<backend>
    launch: dict | None = None  # the Triton kernel's resolved launch options


def plan(model: nn.Module, compile: bool = True, form: str | None = None) -> DecodePlan:
    """How `model`'s caches decode at fixed shapes. `form` forces one of FORMS (tests and benchmarks); None picks.
    Raises UnsupportedBackend with the reason for a combination that cannot run, ValueError for a misuse."""
    caches = model.kv_caches
    if len(caches) != len(model.blocks):
        raise ValueError("a compiled decode step needs a KV cache in every layer: call model.set_kv_caches() first")
    if model.hook is not None:
        raise ValueError("a start-of-layer hook runs Python in every layer: remove it to compile the decode step")
    lacking = sorted({c.name for c in caches if not c.supports_compiled_decode})
    if lacking:
        raise UnsupportedBackend(f"cache {lacking[0]!r} has no fixed-shape decode step (compile=false decodes it)")
    if model.config.attn_softcap is not None or model.config.sliding_window is not None:
        raise UnsupportedBackend("attention softcapping and model-level sliding windows run on the eager path only")
    weighted = {c.requires_attn_weights for c in caches}
    backends = {c.attn_opts.backend for c in caches}
    if len(backends) > 1:
        raise ValueError("every layer's cache must run one attention backend")
    if len(weighted) > 1:  # a hybrid model's window caches with a cache that evicts by attention weights
        names = sorted({c.name for c in caches if c.requires_attn_weights})
        raise UnsupportedBackend(
            f"{names[0]} evicts by attention weights (the grouped step) and the other layers decode through SDPA: one "
            "compiled step runs one form (compile=false decodes it)"
        )
    weighted, backend = weighted.pop(), backends.pop()
    # a step that evicts is not idempotent at its position: the manual CUDA graph would run it twice
    idempotent = all(c.idempotent_decode for c in caches)
    device = model.lm_head.weight.device
    cache = caches[0]
    buf = getattr(cache, "buf", None)  # where the cache keeps K/V (caches/buffers.py), as it declares
    if buf is not None and not buf.compiled_reads:
        raise UnsupportedBackend(
            f"a {type(buf).__name__.removesuffix('KVBuffer').lower()} buffer runs eagerly: its reads dequantize the "
            "whole buffer (compile=false)"
        )
    if weighted:
        if form not in (None, WEIGHTED):
            raise ValueError(
                f"form={form!r}: a score-based cache evicts by attention weights, which only its "
                f"{WEIGHTED!r} step returns"
            )
        if backend not in ("auto", "eager"):  # as its eager step refuses it (model/attention.py, attention)
            raise UnsupportedBackend(f"{backend} cannot run this call: attention weights need the eager path")
        graphs = "trees" if compile and device.type == "cuda" else None
        return DecodePlan(WEIGHTED, graphs, WEIGHTED)
    if backend == "eager":
        raise UnsupportedBackend(
            "sdpa=eager: the compiled decode step runs an SDPA kernel (compile=false decodes through the eager path)"
        )
    quantized = buf is not None and buf.quantized
    if form is None:
        form = (
            "triton"
            if quantized and device.type == "cuda" and backend == "auto"
            else ("sdpa_gqa" if device.type == "cuda" else "sdpa")
        )
    if form not in FORMS:
        raise ValueError(f"form={form!r} is not valid; valid choices: {', '.join(FORMS)}")
    launch = None
    if form == "triton":
        from model import triton_decode

        why = triton_decode.unavailable_reason(device)
        if why:
            raise UnsupportedBackend(f"the Triton decode kernel cannot run: {why}")
        if compile and device.type != "cuda":
            raise UnsupportedBackend("the Triton decode kernel compiles on CUDA only (it runs eagerly elsewhere)")
        p = cache.params
        launch = triton_decode.resolve_options(p.batch_size, p.n_query_groups, cache.cache_length, device, None)
    opts = type(cache.attn_opts)(backend=backend, decode_form=form, launch=launch)
    graphs = ("manual" if idempotent else "trees") if compile and device.type == "cuda" else None
    return DecodePlan(form, graphs, _kernel(model, cache, opts), launch)


def _kernel(model: nn.Module, cache, opts) -> str:
    """decode_kernel asked with a query and key of the step's shapes and strides: the float buffer's own K, or for a
    quantized buffer an empty tensor like the K it decodes."""
    c, p = model.config, cache.params
    dtype = model.lm_head.weight.dtype
    query = torch.empty(p.batch_size, c.n_head, 1, c.head_size, dtype=dtype, device=p.device)
    key = getattr(cache.buf, "k", None)
    if key is None:
        key = torch.empty(p.batch_size, c.n_query_groups, cache.cache_length, c.head_size, dtype=dtype, device=p.device)
    return decode_kernel(query, key[: p.batch_size], opts)


class CompiledDecode(nn.Module):
    """`decoder(token (B, 1), input_pos: int) -> logits (B, 1, vocab)` for a model whose caches are set.

    compile=False runs the same fixed-shape step eagerly (a reference for the compiled one, and what the CPU's
    tensor tracker measures). `form` forces a form of model/decode_attention.py (None: `plan()` picks)."""

    def __init__(self, model: nn.Module, compile: bool = True, form: str | None = None) -> None:
        super().__init__()
        self.plan = plan(model, compile, form)
        self.model = model
        self.compiled = compile
        caches = model.kv_caches
        for cache in caches:  # how each cache's decode_step attends (model/decode_attention.py)
            cache.attn_opts.decode_form = self.plan.form
            cache.attn_opts.launch = self.plan.launch
        device = model.lm_head.weight.device
        self.register_buffer("pos", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self._pos_on_device: int | None = None  # the int `pos` holds (mirrored here: reading it back would sync)
        self._graph = self._static_idx = self._static_logits = None
        if not compile:
            self._step = self._forward
            return
        for tensor in [self.pos, *(b for c in caches for b in c.buffers())]:
            torch._dynamo.mark_static_address(tensor)  # mutated in place at fixed addresses, as HF marks its own
        mode = "reduce-overhead" if self.plan.graphs == "trees" else None  # manual: the graph is ours (_replay)
        self._step = torch.compile(self._forward, mode=mode, fullgraph=True, dynamic=False)

    def _replay(self, idx: Tensor, input_pos: int) -> Tensor:
        """graphs='manual': the compiled step captured once in a torch.cuda.CUDAGraph and replayed with nothing in
        between (no dynamo guards, no graph-tree bookkeeping). The step is idempotent at a given position (it
        writes the same K/V to the same slot, then attends), so the warm-up call that compiles it runs the real
        step, and the first replay runs it again at the same position."""
        if self._graph is None or self._static_idx.shape != idx.shape:
            self._static_idx = idx.clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compile, lazy kernel and library init, outside the capture
                self._step(self._static_idx)
            torch.cuda.current_stream().wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):
                self._static_logits = self._step(self._static_idx)
            self.pos.fill_(input_pos)  # the warm-up advanced it; the capture itself ran nothing
        self._static_idx.copy_(idx)
        self._graph.replay()
        return self._static_logits

    def _forward(self, idx: Tensor) -> Tensor:
        logits = self.model.decode_step(idx, self.pos)  # (B, 1, vocab)
        self.pos.add_(1)  # in the graph: the next replay decodes the next position
        return logits

    def forward(self, idx: Tensor, input_pos: int) -> Tensor:
        if idx.dim() != 2 or idx.shape[1] != 1:
            raise ValueError(f"a decode step takes one token per sequence, idx (B, 1); got {tuple(idx.shape)}")
        caches = self.model.kv_caches
        for cache in caches:
            cache.check_position(idx.shape[0], 1, input_pos)
        if self._pos_on_device != input_pos:
            self.pos.fill_(input_pos)
        if self.plan.graphs == "manual":
            logits = self._replay(idx, input_pos)
        else:
            if self.plan.graphs == "trees":
                torch.compiler.cudagraph_mark_step_begin()
            logits = self._step(idx)
        # The graph's output buffer is overwritten by the next replay: hand out a copy (B x vocab, negligible).
        logits = logits.clone()
        self._pos_on_device = input_pos + 1
        for cache in caches:
            cache.decoded(input_pos)
        record("compiled" if self.compiled else "static")
        return logits
