"""Where a compiled decode step's time goes: kernels by device time, and the host's share of a step.

    python benchmarks/profile_decode.py                               # CUDA: llama-3.2-1b bf16, dense, 32k x 4
    python benchmarks/profile_decode.py --model tiny --ctx 1024 --batch 2   # CPU (no graphs, CPU ops only)
    python benchmarks/profile_decode.py --model smollm2-135m --ctx 2k --batch 1 --cache keydiff --budget 0.25

After a chunked prefill and the warm-up that compiles (and on CUDA records the CUDA graphs), it times the step
three ways: each step synchronised (what the harness reports), `--steps` steps back to back with one
synchronisation (the device-bound rate: the difference is host time the device waits for), and under
torch.profiler, whose kernels are summed per name. On the CPU inductor's own kernels are named in the profile
(`graph_0_cpp_fused_...`: the elementwise work, the cache's writes, scoring and selection; inductor may fuse the same
work of every layer into one kernel); `aten::mm` is the weights, the SDPA op the attention. Prints JSON lines: one
summary, then the top kernels.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

from bench.config.spec import DTYPES, parse_ctx
from bench.measure.memory import measured_bandwidth
from bench.measure.timing import sync
from model.compiled_decode import CompiledDecode
from model.config import CONFIGS, Config
from model.generate import prefill
from model.gpt import GPT


def kernel_table(prof, device: torch.device, steps: int) -> list[dict]:
    """Device (CUDA) or CPU self time per kernel name, per step, largest first."""
    per_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if device.type == "cuda":  # the kernels themselves (device events), not the CPU ops that launched them
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.time_range.elapsed_us()
        else:
            us = event.self_cpu_time_total
        entry = per_name[event.name]
        entry[0] += us
        entry[1] += 1
    rows = [
        {"kernel": name[:120], "us_per_step": us / steps, "calls_per_step": n / steps}
        for name, (us, n) in per_name.items()
    ]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def random_model(name: str, dtype: torch.dtype, device: torch.device) -> GPT:
    """Random weights of a named shape, built in `dtype` on `device` (seed 0)."""
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return GPT(Config.from_name(name)).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(torch.float32)


def time_steps(decoder, token: torch.Tensor, pos: int, steps: int, device: torch.device):
    """`steps` decode steps each synchronised (what the harness reports), then `steps` back to back with one
    synchronisation (the device-bound rate). Returns (token, next position, seconds of each synchronised step,
    seconds per back-to-back step)."""
    synced = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        token = decoder(token, input_pos=pos)[:, -1:].argmax(-1)  # (B, 1)
        pos += 1
        sync(device)
        synced.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(steps):
        token = decoder(token, input_pos=pos)[:, -1:].argmax(-1)
        pos += 1
    sync(device)
    return token, pos, synced, (time.perf_counter() - t) / steps


@torch.inference_mode()
def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b" if cuda else "tiny", choices=list(CONFIGS))
    ap.add_argument("--ctx", type=parse_ctx, default=32768)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--cache", default="dense")
    ap.add_argument(
        "--sdpa",
        default="auto",
        choices=["auto", "flash", "efficient", "cudnn", "math"],
        help="the SDPA kernel (prefill, and the compiled step's sdpa forms)",
    )
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=list(DTYPES))
    ap.add_argument("--budget", type=float, default=0.25, help="the fraction of ctx a cache other than dense keeps")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    torch._inductor.config.cpp.enable_kernel_profile = True  # inductor's CPU kernels by name in the profile
    dtype = DTYPES[args.dtype]
    model = random_model(args.model, dtype, device)
    cfg = model.config
    length = args.ctx + 3 * args.steps + 16
    model.set_kv_caches(args.batch, args.cache, length if args.cache == "dense" else int(args.ctx * args.budget))
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.ctx), device=device)  # (B, ctx)
    model.set_attention_backend(args.sdpa)
    decoder = CompiledDecode(model)
    token = prefill(model, ids, 2048).argmax(-1, keepdim=True)  # (B, 1)
    pos = args.ctx
    t0 = time.perf_counter()
    for _ in range(3):  # compile; CUDA graphs are recorded on the third call
        token = decoder(token, input_pos=pos)[:, -1:].argmax(-1)  # (B, 1)
        pos += 1
    sync(device)
    compile_s = time.perf_counter() - t0

    token, pos, synced, back_to_back = time_steps(decoder, token, pos, args.steps, device)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    profiled = args.steps // 4
    with profile(activities=activities) as prof:
        for _ in range(profiled):
            token = decoder(token, input_pos=pos)[:, -1:].argmax(-1)
            pos += 1
        sync(device)
    kernels = kernel_table(prof, device, profiled)

    itemsize = torch.empty((), dtype=dtype).element_size()
    embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd * itemsize
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - embedding
    kv = sum(c.size_estimate() for c in model.kv_caches)  # the whole buffer: the compiled step reads every slot
    bandwidth = measured_bandwidth(device)
    summary = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": args.model,
        "ctx": args.ctx,
        "batch": args.batch,
        "cache": args.cache,
        "dtype": args.dtype,
        "form": decoder.plan.form,
        "kernel": decoder.plan.kernel,
        "graphs": decoder.plan.graphs,
        "compile_s": compile_s,
        "synced_ms_p50": statistics.median(synced) * 1e3,
        "back_to_back_ms": back_to_back * 1e3,
        "kernel_ms_per_step": sum(k["us_per_step"] for k in kernels) / 1e3 if cuda else None,
        "bytes_per_step": weights + kv,
        "bandwidth_bytes_s": bandwidth,
        "roofline_ms": (weights + kv) / bandwidth * 1e3 if bandwidth else None,
    }
    print(json.dumps(summary), flush=True)
    for row in kernels[: args.top]:
        print(json.dumps(row), flush=True)
    if cuda:  # where the host's time goes (guards, graph replay, our Python): the ops' own CPU time per step
        host = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[: args.top]
        for event in host:
            print(
                json.dumps(
                    {
                        "host": event.key[:120],
                        "self_cpu_us_per_step": event.self_cpu_time_total / profiled,
                        "calls_per_step": event.count / profiled,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
