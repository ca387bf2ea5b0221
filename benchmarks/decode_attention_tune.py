"""One layer's decode attention, alone, through each formulation the compiled decode step can use, and kernel
option sets of the flex and Triton kernels: how close each gets to reading K/V at the measured bandwidth.

    python benchmarks/decode_attention_tune.py                  # CUDA: Llama-3.2-1B heads, bf16, 32k:4 and 8k:1
    python benchmarks/decode_attention_tune.py --case 1k:2      # CPU: sdpa forms (flex and triton need CUDA compiled)

Times `model.attention.static_decode_attention` (what a cache's `decode_step` calls) on random q (B, n_head, 1, hs)
and a K/V buffer of ctx + 64 slots with ctx filled, for each variant of `--grid`: `FORM[:KEY=VALUE]...`, FORM one
of sdpa, sdpa_gqa, flex, triton, keys `sdpa` (the SDPA kernel) and the kernel options BLOCK_N, num_stages,
num_warps, SPLIT_KV. On CUDA each variant is compiled, 20 calls are captured in one CUDA graph and the replay
timed, so launch overhead is not counted; SDPA flash over the filled slots only (no mask, `enable_gqa`) is the
reference. Prints one JSON line per variant: microseconds per call, max |error| against SDPA in float32, the
K/V bytes it must read, and that over the measured device-to-device bandwidth (`bw_frac`).

Then eager SDPA over the filled slots (an eager decode step's call) per kernel (cuDNN and flash on CUDA, math on
the CPU), two ways: at one key length called again and again, and with one more key each call, as eager decode
grows its cache. PyTorch keys its cache of built cuDNN graphs by the key length among other shapes
(aten/src/ATen/native/cudnn/MHA.cpp, `MHAParams.s_kv`): if building a graph is what an eager cuDNN decode step
spends its time on (46-61 ms/step in results/baselines/h200/backend_matrix/), the second way is that slow and the
first is not.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.measure import measured_bandwidth, sync
from bench.spec import DTYPES, KernelOptions, parse_ctx
from model.attention import DECODE_FORMULATIONS, AttentionOptions, static_decode_attention
from model.config import CONFIGS, Config

DEFAULT_GRID = ",".join([
    "sdpa_gqa", "sdpa", "sdpa_gqa:sdpa=cudnn", "flex", "flex:num_stages=3", "flex:BLOCK_N=64:num_stages=3",
    "flex:BLOCK_N=128:num_stages=3:num_warps=8", "triton", "triton:num_stages=4", "triton:BLOCK_N=128:num_warps=8",
    "triton:BLOCK_N=32:num_stages=4:num_warps=2",
])  # fmt: skip
CALLS = 20  # calls per timed replay


def timed_us(fn, device: torch.device, repeats: int = 5) -> float:
    """Microseconds per call of fn: CUDA graphs of CALLS calls replayed (CUDA), or plain calls (CPU)."""
    for _ in range(3):  # compile, lazy init
        fn()
    sync(device)
    if device.type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(CALLS):
                fn()
        graph.replay()
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            graph.replay()
            sync(device)
            times.append((time.perf_counter() - t0) / CALLS)
    else:
        times = []
        for _ in range(repeats * CALLS):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def eager_ms(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], backend: SDPBackend) -> float:
    """Median milliseconds of one eager SDPA call over the first `lengths[i]` slots of K/V (`enable_gqa`, no mask),
    each call synchronised and timed from the host."""
    times = []
    for n in lengths:
        sync(q.device)
        t0 = time.perf_counter()
        with sdpa_kernel([backend]):
            F.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], enable_gqa=True)
        sync(q.device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def parse_variant(text: str) -> AttentionOptions:
    """`triton:BLOCK_N=128:num_warps=8` -> the AttentionOptions a cache's decode step would carry."""
    form, *pairs = text.split(":")
    if form not in DECODE_FORMULATIONS:
        raise ValueError(f"variant {text!r}: {form!r} is not valid; valid: {', '.join(DECODE_FORMULATIONS)}")
    backend, options = "auto", {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "sdpa":
            backend = value
        elif key in KernelOptions.__dataclass_fields__ and value.isdigit():
            options[key] = int(value)
        else:
            raise ValueError(f"variant {text!r}: {pair!r} is not valid; valid: sdpa=KERNEL, "
                             f"{', '.join(f'{k}=N' for k in KernelOptions.__dataclass_fields__)}")  # fmt: skip
    return AttentionOptions(backend=backend, decode_attention=form, kernel_options=options or None)


def run_case(args, cfg: Config, ctx: int, batch: int, device: torch.device, bandwidth: float | None) -> None:
    dtype = DTYPES[args.dtype]
    slots = ctx + 64
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, cfg.n_head, 1, cfg.head_size, device=device, dtype=dtype, generator=gen)
    kv_shape = (batch, cfg.n_query_groups, slots, cfg.head_size)
    k = torch.randn(kv_shape, device=device, dtype=dtype, generator=gen)
    v = torch.randn(kv_shape, device=device, dtype=dtype, generator=gen)
    n_valid = torch.tensor(ctx, device=device)
    kv_bytes = 2 * batch * cfg.n_query_groups * ctx * cfg.head_size * q.element_size()
    expected = F.scaled_dot_product_attention(q.float(), k[:, :, :ctx].float(), v[:, :, :ctx].float(), enable_gqa=True)
    expected = expected.transpose(1, 2).reshape(batch, 1, -1)  # (B, 1, n_head * hs)
    base = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "model": args.model,
            "ctx": ctx, "batch": batch, "dtype": args.dtype, "kv_bytes": kv_bytes}  # fmt: skip

    def report(name: str, fn, **extra) -> None:
        try:
            us = timed_us(fn, device)
            err = (fn().float() - expected).abs().max().item()
            row = {**base, "variant": name, **extra, "us": us, "max_abs_err": err}
            if bandwidth:
                row["bw_frac"] = kv_bytes / (us / 1e6) / bandwidth
        except Exception as e:  # noqa: BLE001 - a variant that does not compile or run is a result
            row = {**base, "variant": name, **extra, "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(row), flush=True)

    calls = 8  # first: a few seconds, before the compiled variants (the GPU script's step limit may cut those)
    kernels = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    for name, backend in (kernels if device.type == "cuda" else {"math": SDPBackend.MATH}).items():
        row = {**base, "variant": f"eager sdpa={name}", "calls": calls}
        try:
            eager_ms(q, k, v, [ctx] * 2, backend)  # load the kernel; build the graph for this length
            row["ms_same_length"] = eager_ms(q, k, v, [ctx] * calls, backend)
            row["ms_growing_length"] = eager_ms(q, k, v, list(range(ctx + 1, ctx + 1 + calls)), backend)
        except Exception as e:  # noqa: BLE001 - a kernel that does not run here is a result
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps(row), flush=True)

    for text in [t for t in args.grid.split(",") if t]:
        opts = parse_variant(text)
        if opts.decode_attention == "triton":  # the launch options a compiled step settles on (CompiledDecode)
            from model.triton_decode import resolve_options

            opts.kernel_options = resolve_options(batch, cfg.n_query_groups, slots, device, opts.kernel_options)
        torch._dynamo.reset()

        def step(opts=opts):
            return static_decode_attention(q, k, v, n_valid, opts)

        if device.type == "cuda":  # the CPU cannot compile flex or triton (and eager flex materialises the scores)
            step = torch.compile(step, fullgraph=True)
        report(text, step, options=opts.kernel_options)
    if device.type == "cuda":

        def flash():  # the reference: no mask, only the filled slots
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k[:, :, :ctx], v[:, :, :ctx], enable_gqa=True)

        report("flash over the filled slots", lambda: flash().transpose(1, 2).reshape(batch, 1, -1))


@torch.inference_mode()
def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b", choices=list(CONFIGS), help="for its head shapes")
    ap.add_argument("--case", action="append", help="CTX:BATCH, repeatable (default 32k:4 and 8k:1)")
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=list(DTYPES))
    ap.add_argument("--grid", default=DEFAULT_GRID if cuda else "sdpa,sdpa_gqa", help="variants, comma-separated")
    args = ap.parse_args()
    for text in [t for t in args.grid.split(",") if t]:
        try:
            parse_variant(text)
        except ValueError as err:
            ap.error(str(err))
    device = torch.device("cuda" if cuda else "cpu")
    cfg = Config.from_name(args.model)
    bandwidth = measured_bandwidth(device)
    for case in args.case or ["32k:4", "8k:1"]:
        ctx_text, batch_text = case.split(":")
        run_case(args, cfg, parse_ctx(ctx_text), int(batch_text), device, bandwidth)


if __name__ == "__main__":
    main()
