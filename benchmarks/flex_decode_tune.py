"""One decode step's attention through FlexAttention, for a grid of kernel options, against stock SDPA kernels.

    python benchmarks/flex_decode_tune.py                        # CUDA: Llama-3.2-1B heads, bf16, 32k:4 and 8k:1
    python benchmarks/flex_decode_tune.py --case 1k:2            # CPU: eager flex, default options (a smoke test)

Times `model.attention._flex_decode` (what the compiled decode step runs with decode_attention=flex) on random
q (B, n_head, 1, hs) and a K/V buffer of ctx + 64 slots with ctx filled, for each option set of `--grid`
(`BLOCK_N:num_stages:num_warps` triples; "default" is inductor's choice). On CUDA each variant is compiled,
then 20 calls are captured in one CUDA graph and the replay timed, so launch overhead is not counted; the
references are SDPA over the filled slots with `enable_gqa` (flash, cudnn), captured the same way. Prints one
JSON line per variant: microseconds per call, the K/V bytes it must read, and that over the measured
device-to-device bandwidth (`bw_frac`). Use the best options as `kernel_options.*` in the harness.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.measure import measured_bandwidth, sync
from bench.spec import DTYPES, parse_ctx
from model.attention import _flex_decode
from model.config import CONFIGS, Config

DEFAULT_GRID = "default,64:3:2,64:4:2,64:3:4,128:3:4,128:4:4,32:3:2,128:2:8"
CALLS = 20  # calls per timed replay


def timed_us(fn, device: torch.device, repeats: int = 5) -> float:
    """Microseconds per call of fn: CUDA graphs of CALLS calls replayed (CUDA), or plain calls (CPU)."""
    for _ in range(3):  # compile, autotune, lazy init
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


def parse_variant(text: str) -> dict | None:
    if text == "default":
        return None
    block_n, stages, warps = (int(x) for x in text.split(":"))
    return {"BLOCK_N": block_n, "num_stages": stages, "num_warps": warps}


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
    expected = F.scaled_dot_product_attention(q, k[:, :, :ctx], v[:, :, :ctx], enable_gqa=True)
    base = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "model": args.model,
            "ctx": ctx, "batch": batch, "dtype": args.dtype, "kv_bytes": kv_bytes}  # fmt: skip

    def report(name: str, fn, **extra) -> None:
        try:
            us = timed_us(fn, device)
            err = (fn().float() - expected.float()).abs().max().item()
            row = {**base, "variant": name, **extra, "us": us, "max_abs_err": err}
            if bandwidth:
                row["bw_frac"] = kv_bytes / (us / 1e6) / bandwidth
        except Exception as e:  # noqa: BLE001 - a variant that does not compile or run is a result
            row = {**base, "variant": name, **extra, "error": f"{type(e).__name__}: {e}"[:300]}
        print(json.dumps(row), flush=True)

    for text in [t for t in args.grid.split(",") if t]:
        options = parse_variant(text)
        torch._dynamo.reset()
        step = partial(_flex_decode, scale=None, kernel_options=options)
        if device.type == "cuda":  # inductor's CPU flex template fails for these shapes (torch 2.13): eager there
            step = torch.compile(step, fullgraph=True)
        report(f"flex {text}", lambda step=step: step(q, k, v, n_valid), options=options)
    if device.type == "cuda":
        for name, backend in [("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)]:

            def sdpa(backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k[:, :, :ctx], v[:, :, :ctx], enable_gqa=True)

            report(name, sdpa)


@torch.inference_mode()
def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b", choices=list(CONFIGS), help="for its head shapes")
    ap.add_argument("--case", action="append", help="CTX:BATCH, repeatable (default 32k:4 and 8k:1)")
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=list(DTYPES))
    ap.add_argument("--grid", default=DEFAULT_GRID if cuda else "default", help="variants, comma-separated")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = Config.from_name(args.model)
    bandwidth = measured_bandwidth(device)
    for case in args.case or ["32k:4", "8k:1"]:
        ctx_text, batch_text = case.split(":")
        run_case(args, cfg, parse_ctx(ctx_text), int(batch_text), device, bandwidth)


if __name__ == "__main__":
    main()
