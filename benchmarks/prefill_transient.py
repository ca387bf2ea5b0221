"""The prefill's transient memory and time per cache, beside dense's at the same prefill chunk: the exact peak of
live tensor bytes (bench.measure.TensorTracker) less weights and caches, and the best of `--repeats` untracked
prefills.

    python benchmarks/prefill_transient.py                                  # tiny, ctx 16k, chunk 2048, budget 0.25
    python benchmarks/prefill_transient.py --ctx 16384 --chunk 512 --budget 1024 --caches h2o,snapkv

Prints one JSON line per cache.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from bench.measure.memory import TensorTracker
from model.generate import prefill_chunks
from model.gpt import GPT


@torch.inference_mode()
def prefill(model: GPT, ids: torch.Tensor, chunk: int) -> None:
    for start, end in prefill_chunks(model, ids.shape[1], chunk):
        model(ids[:, start:end], input_pos=start, skip_lm_head=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--ctx", type=int, default=16384)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--budget", type=float, default=0.25, help="a fraction of ctx, or a number of tokens")
    ap.add_argument("--caches", default="dense,last_recent,h2o,tova,snapkv,qh2o")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model = GPT.from_name(args.model).eval().requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.ctx), generator=gen)  # (B, ctx)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    for name in args.caches.split(","):
        budget = int(args.budget * args.ctx) if args.budget <= 1 else int(args.budget)
        model.set_kv_caches(args.batch, name, args.ctx if name == "dense" else budget)
        tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        resident = sum(t.numel() * t.element_size() for t in tensors.values()) + ids.numel() * ids.element_size()
        tracker = TensorTracker(baseline=resident)
        with tracker:
            prefill(model, ids, args.chunk)
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            prefill(model, ids, args.chunk)
            seconds.append(time.perf_counter() - t0)
        cache = sum(c.size_estimate() for c in model.kv_caches)
        print(
            json.dumps(
                {
                    "cache": name,
                    "ctx": args.ctx,
                    "chunk": args.chunk,
                    "budget": args.budget,
                    "peak_bytes": tracker.peak,
                    "weights_bytes": weights,
                    "cache_bytes": cache,
                    "transient_bytes": tracker.peak - weights - cache,
                    "prefill_s": min(seconds),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
