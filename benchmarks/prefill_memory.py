"""Temporary memory of one prefill chunk deep into a long context: what the chunk allocates beyond weights and
caches (activations, MLP temporaries, attention masks), per layer shape.

    python benchmarks/prefill_memory.py                                   # llama-3.2-1b layer, bf16, 32k, batch 4
    python benchmarks/prefill_memory.py --model smollm2-135m --batch 1 --ctx 8192

A dense cache allocates its buffers whole, and a chunk's temporaries do not depend on what the earlier slots
hold, so the cache is placed at position ctx - chunk without computing the earlier chunks (one layer: the
temporaries of a layer are freed before the next one runs). CPU: the exact peak of live tensor bytes created
during the call (bench.measure.TensorTracker); CUDA: torch's allocated peak minus what was allocated before, and
the reserved peak. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.config.spec import DTYPES, parse_ctx
from bench.measure.memory import TensorTracker
from bench.measure.timing import sync
from model.config import CONFIGS, Config
from model.gpt import GPT


@torch.inference_mode()
def chunk_transient(model: GPT, batch: int, chunk: int, ctx: int, device: torch.device) -> dict:
    model.set_kv_caches(batch, "dense", cache_length=ctx)
    for cache in model.kv_caches:  # as if ctx - chunk tokens were already in
        cache.next_token_pos, cache.batch_size = ctx - chunk, batch
    ids = torch.randint(0, model.config.vocab_size, (batch, chunk), device=device)  # (B, chunk)
    model(ids, input_pos=ctx - chunk, skip_lm_head=True)  # warm-up (kernel choice, allocator growth)
    for cache in model.kv_caches:
        cache.next_token_pos = ctx - chunk
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        model(ids, input_pos=ctx - chunk, skip_lm_head=True)
        sync(device)
        out = {
            "transient_bytes": torch.cuda.max_memory_allocated(device) - before,
            "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
        }
    else:
        with TensorTracker() as tracker:
            model(ids, input_pos=ctx - chunk, skip_lm_head=True)
        out = {"transient_bytes": tracker.peak_dynamic}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b", choices=list(CONFIGS))
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    ap.add_argument("--ctx", default="32k")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device, ctx = torch.device(args.device), parse_ctx(args.ctx)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(Config.from_name(args.model, n_layer=1)).to(DTYPES[args.dtype]).eval()
    result = chunk_transient(model, args.batch, args.chunk, ctx, device)
    tokens = args.batch * args.chunk
    print(
        json.dumps(
            {
                "model": args.model,
                "dtype": args.dtype,
                "device": device.type,
                "ctx": ctx,
                "batch": args.batch,
                "chunk": args.chunk,
                **result,
                "bytes_per_token": round(result["transient_bytes"] / tokens, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
