"""A decode step compiled with fixed shapes and, on CUDA, replayed from CUDA graphs.

Decode is memory-bound: a step must read the weights and the K/V once, and at batch 1-4 an eager step spends
more time launching ~15 kernels per layer than reading memory (H200, Llama-3.2-1B: ~8 ms per step at any
context, results/baselines/h200/). Compiled and captured, the step is a handful of fused kernels replayed
with one launch.

    model.set_kv_caches(batch, "dense", cache_length)
    decoder = CompiledDecode(model)                 # compile=True; CUDA: mode="reduce-overhead" (CUDA graphs)
    token = model(prompt, input_pos=0)[:, -1:].argmax(-1)   # prefill as always: eager, chunked
    logits = decoder(token, input_pos=T)            # the int API, checked here, outside the graph

A captured graph replays with the same arguments, so the position cannot be a new Python int each step. It is a
0-d tensor on the device (`pos`) that the step advances itself; the int stays the API: every call checks it
against the caches (`check_position`) and only writes it to the device when it is not the one the step left
there (after a new prefill, say), which costs no host synchronisation. Each cache's `decode_step` writes the
new K/V at `pos` and attends the filled slots of its buffer (`static_decode_attention`: FlexAttention over the
filled blocks, or SDPA under a slot mask; K/V never expanded).

Caches with a decode step (`supports_compiled_decode`): dense and last_recent, whose storage does not depend on
the tokens, and the score-based ones (h2o, qh2o, tova, snapkv), whose step computes the softmax weights at fixed
shapes and evicts with reductions and masked scatters on the device (caches/scored.py); on any buffer (float,
int8, int4). The score-based caches attend through the grouped formulation (the only one that returns weights).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from caches import cache_class, cache_names
from model.attention import DECODE_FORMULATIONS, UnsupportedBackend, static_decode_kernel


def compiled_decode_caches() -> list[str]:
    """Names of the caches that have a compiled decode step."""
    return [name for name in cache_names() if cache_class(name).supports_compiled_decode]


DECODE_ATTENTION = ("auto", *DECODE_FORMULATIONS)  # auto: sdpa_gqa on CUDA, sdpa elsewhere (resolve_decode_attention)
WEIGHTED = "grouped"  # the formulation of the caches that need attention weights (model/attention.py)
MANUAL_NEEDS_IDEMPOTENT = ("graphs='manual' runs a step twice at one position, which a score-based cache's step "
                           "does not allow (it would score and evict twice); valid choices: trees")  # fmt: skip
CUDA_GRAPHS = ("trees", "manual")  # inductor's CUDA-graph trees (mode="reduce-overhead"), or one graph of our own
CUDA_GRAPHS_KNOB = ("auto", *CUDA_GRAPHS)  # the harness's choices (resolve_cuda_graphs)


def resolve_cuda_graphs(graphs: str, weighted: bool = False) -> str:
    """auto: our one manual graph, except for a score-based cache (weighted), whose step cannot run twice at one
    position (MANUAL_NEEDS_IDEMPOTENT): graph trees. Measured on an H200 (results/baselines/h200/README.md, "Compiled
    decode (issue 8), runs 3 and 4"): the same Triton step at 32k x 4 took 2.61 ms in the manual graph, 3.06 in
    trees."""
    if graphs not in CUDA_GRAPHS_KNOB:
        raise ValueError(f"cuda_graphs={graphs!r} is not valid; valid choices: {', '.join(CUDA_GRAPHS_KNOB)}")
    if graphs == "auto":
        return "trees" if weighted else "manual"
    return graphs


def resolve_decode_attention(
    attention: str, device_type: str, compiled: bool, sdpa: str = "auto", weighted: bool = False
) -> str:
    """auto: SDPA with `enable_gqa` on CUDA (sdpa_gqa: cuDNN reads the buffer once per KV head), SDPA on the CPU or
    where an SDPA kernel is forced (sdpa != auto). On an H200 at 32k x 4 (results/baselines/h200/README.md, "Compiled
    decode (issue 8), runs 3 and 4") the whole step took 2.58 ms with sdpa_gqa, 2.61 with our Triton kernel and
    4.31 with FlexAttention, which was auto before. For caches that need attention weights (weighted), always the
    grouped formulation (`static_weighted_decode`), the only one that returns them. Compiled flex is refused on the CPU:
    inductor's CPU lowering of FlexAttention fails inside the model's graph (torch 2.13: "No choices to select" for
    a query computed in the graph); eagerly (compile=False) it runs anywhere. Our Triton kernel runs on CUDA, and
    eagerly on the CPU under Triton's interpreter. Neither runs an SDPA kernel, so a forced one is refused with them."""
    if weighted:
        if attention not in ("auto", WEIGHTED):
            raise ValueError(f"decode_attention={attention}: a score-based cache evicts by attention weights, which "
                             "only its grouped step returns; valid choice: auto")  # fmt: skip
        return WEIGHTED
    if attention not in DECODE_ATTENTION:
        raise ValueError(f"decode_attention={attention!r} is not valid; valid choices: {', '.join(DECODE_ATTENTION)}")
    if attention == "auto":
        return "sdpa_gqa" if device_type == "cuda" and sdpa == "auto" else "sdpa"
    if attention in ("flex", "triton") and compiled and device_type != "cuda":
        raise ValueError(f"decode_attention={attention} compiles on CUDA only; valid choices on {device_type}: auto, "
                         "sdpa, sdpa_gqa (or compile=false)")  # fmt: skip
    if attention in ("flex", "triton") and sdpa != "auto":
        raise ValueError(f"decode_attention={attention} runs no SDPA kernel, so sdpa={sdpa!r} cannot apply; valid "
                         "choices with a forced SDPA kernel: auto, sdpa, sdpa_gqa")  # fmt: skip
    if attention == "triton":
        from model.triton_decode import unavailable_reason

        why = unavailable_reason(torch.device(device_type))
        if why:
            raise ValueError(f"decode_attention=triton: {why}; valid choices here: auto, sdpa, sdpa_gqa")
    return attention


class CompiledDecode(nn.Module):
    """`decoder(token (B, 1), input_pos: int) -> logits (B, 1, vocab)` for a model whose caches are set.

    compile=False runs the same fixed-shape step eagerly (a reference for the compiled one). mode: torch.compile's
    mode; "auto" is "reduce-overhead" (CUDA graphs) on CUDA and the default (no graphs) elsewhere. attention: how
    the step attends its buffer, "flex" (FlexAttention), "sdpa" (masked SDPA, query heads as rows of their KV
    group), "sdpa_gqa" (masked SDPA with enable_gqa) or "triton" (model/triton_decode.py); "auto" is sdpa_gqa on
    CUDA, sdpa elsewhere. The SDPA forms run the kernel the caches' attention backend names
    (`model.set_attention_backend`; "auto": flash, cuDNN, mem-efficient, math, the first that can); `kernel` says
    which. kernel_options: options of the flex or triton kernel (e.g. {"BLOCK_N": 64, "num_stages": 3}).
    graphs (CUDA): "trees" captures through torch.compile's mode="reduce-overhead"; "manual" compiles without it
    and captures the step in one torch.cuda.CUDAGraph of its own, replayed without dynamo's guards (`_replay`).
    """

    def __init__(
        self,
        model: nn.Module,
        compile: bool = True,
        mode: str | None = "auto",
        attention: str = "auto",
        kernel_options: dict | None = None,
        graphs: str = "trees",
    ) -> None:
        super().__init__()
        if graphs not in CUDA_GRAPHS:
            raise ValueError(f"graphs={graphs!r} is not valid; valid choices: {', '.join(CUDA_GRAPHS)}")
        caches = model.kv_caches
        if len(caches) != len(model.blocks):
            raise ValueError("CompiledDecode needs a KV cache in every layer: call model.set_kv_caches() first")
        lacking = sorted({c.name for c in caches if not c.supports_compiled_decode})
        if lacking:
            raise ValueError(f"cache {lacking[0]!r} has no compiled decode step; caches that have one: "
                             f"{', '.join(compiled_decode_caches())}")  # fmt: skip
        if model.hook is not None:
            raise ValueError("a start-of-layer hook runs Python in every layer: remove it to compile the decode step")
        if model.config.attn_softcap is not None or model.config.sliding_window is not None:
            raise ValueError("attention softcapping and model-level sliding windows run on the eager path only")
        needs_weights = {c.requires_attn_weights for c in caches}
        if len(needs_weights) > 1:
            raise ValueError("caches that need attention weights and caches that do not: the compiled step runs one "
                             "attention formulation in every layer")  # fmt: skip
        weighted = needs_weights.pop()
        if graphs == "manual" and weighted:  # _replay runs its warm-up step, then the same step again
            raise ValueError(MANUAL_NEEDS_IDEMPOTENT)
        backends = sorted({c.attn_opts.backend for c in caches})
        if len(backends) > 1 or (backends[0] == "eager" and not weighted):
            raise ValueError(f"sdpa={backends[-1]!r}: the compiled decode step runs one SDPA kernel in every layer; "
                             "valid choices: auto, flash, efficient, cudnn, math (or compile=false)")  # fmt: skip
        self.model = model
        device = model.lm_head.weight.device
        self.register_buffer("pos", torch.zeros((), dtype=torch.long, device=device), persistent=False)
        self._pos_on_device: int | None = None  # the int `pos` holds (mirrored here: reading it back would sync)
        self.graphs = graphs if compile and device.type == "cuda" else None
        if graphs == "manual" and self.graphs is None:
            raise ValueError("graphs='manual' captures the compiled step in a CUDA graph: it needs compile=True and a "
                             "CUDA device; valid choices here: trees")  # fmt: skip
        self.mode = ("reduce-overhead" if device.type == "cuda" else None) if mode == "auto" else mode
        if self.graphs == "manual":
            self.mode = None  # inductor's code without its CUDA-graph trees: the graph is ours (_replay)
        self._graph = self._static_idx = self._static_logits = None
        self.attention = resolve_decode_attention(attention, device.type, compile, backends[0], weighted)
        if kernel_options and self.attention not in ("flex", "triton"):
            raise ValueError(f"kernel_options apply to attention='flex' or 'triton' only (this step attends with "
                             f"{self.attention!r})")  # fmt: skip
        self.kernel_options = dict(kernel_options) if kernel_options else None
        launch = self.kernel_options
        if self.attention == "triton":  # every launch option settled here: tracing the step queries no device
            from model.triton_decode import resolve_options

            p = caches[0].params
            launch = resolve_options(p.batch_size, p.n_query_groups, caches[0].cache_length, device, launch)
        if not weighted:  # how each cache's decode_step attends (model/attention.py, static_decode_attention)
            for cache in caches:
                cache.attn_opts.decode_attention = self.attention
                cache.attn_opts.kernel_options = launch
        self.compiled = compile
        self.kernel = self._kernel(model, caches[0])  # raises UnsupportedBackend for a forced kernel that cannot run
        if compile:  # tensors the graph mutates in place at fixed addresses (as HF's StaticCache marks its own)
            for tensor in [self.pos, *(b for c in caches for b in c.buffers())]:
                torch._dynamo.mark_static_address(tensor)
        self._step = torch.compile(self._forward, mode=self.mode, fullgraph=True, dynamic=False) if compile else (
            self._forward)  # fmt: skip

    @staticmethod
    def _kernel(model: nn.Module, cache) -> str:
        """What the step's attention runs (static_decode_kernel), asked with a query and key of the step's shapes
        and strides: the float buffer's own K, or for a quantized buffer an empty tensor like the K it decodes. A
        cache that needs attention weights runs the grouped formulation, under sdpa=auto or eager only."""
        if cache.requires_attn_weights:
            backend = cache.attn_opts.backend
            if backend not in ("auto", "eager"):  # as its eager step refuses it (model/attention.py, attention)
                raise UnsupportedBackend(f"{backend} cannot run this call: attention weights need the eager path")
            return WEIGHTED
        if cache.attn_opts.decode_attention in ("flex", "triton"):  # no SDPA kernel to choose
            return static_decode_kernel(None, None, cache.attn_opts)
        c, p = model.config, cache.params
        dtype = model.lm_head.weight.dtype
        query = torch.empty(p.batch_size, c.n_head, 1, c.head_size, dtype=dtype, device=p.device)
        key = getattr(cache.buf, "k", None)
        if key is None or key.dtype != dtype or key.shape[-1] != c.head_size:
            key = torch.empty(p.batch_size, c.n_query_groups, cache.cache_length, c.head_size, dtype=dtype,
                              device=p.device)  # fmt: skip
        return static_decode_kernel(query, key[: p.batch_size], cache.attn_opts)

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
        if self.graphs == "manual":
            logits = self._replay(idx, input_pos)
        else:
            if self.compiled and self.mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            logits = self._step(idx)
        # The graph's output buffer is overwritten by the next replay: hand out a copy (B x vocab, negligible).
        logits = logits.clone()
        self._pos_on_device = input_pos + 1
        for cache in caches:
            cache.decoded(input_pos)
            cache.backends_seen.add("compiled" if self.compiled else "static")
        return logits
