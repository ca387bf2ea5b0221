"""The compiled decode step against the eager one on whatever device is here: greedy tokens and step time.

    python benchmarks/compiled_vs_eager.py                          # CUDA: llama-3.2-1b bf16, ctx 4k, batch 2
    python benchmarks/compiled_vs_eager.py --model tiny --ctx 1024  # CPU

Each cache decodes through the form and CUDA graph `model.compiled_decode.plan` picks for it. Prints
one JSON line per cache: steps until the first differing token (of --steps), max |logit difference| over
the steps both agree on, ms/step p50 of each path (after a warm-up that compiles and records the CUDA graphs),
and how many CUDA graphs inductor declined to record. On CUDA in bf16 the two paths reduce in different orders,
so a late divergence between near-tied logits is possible; an early one, or cudagraph_skips > 0, is a finding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch._dynamo.utils import counters

from bench.measure.timing import sync
from model.compiled_decode import CompiledDecode
from model.config import Config
from model.gpt import GPT


@torch.inference_mode()
def greedy(model: GPT, prompt: torch.Tensor, step, steps: int, device: torch.device):
    """(tokens (B, steps), logits (B, steps, vocab), step seconds)."""
    token = model(prompt, input_pos=0)[:, -1:].argmax(-1)  # (B, 1)
    tokens, logits, times = [], [], []
    for i in range(steps):
        sync(device)
        t0 = time.perf_counter()
        out = step(token, input_pos=prompt.shape[1] + i)  # (B, 1, vocab)
        token = out[:, -1:].argmax(-1)
        sync(device)
        times.append(time.perf_counter() - t0)
        tokens.append(token)
        logits.append(out.float())
    return torch.cat(tokens, 1), torch.cat(logits, 1), times


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b" if cuda else "tiny")
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--caches", default="dense,last_recent,dense-int8,h2o", help="comma-separated, from the default")
    ap.add_argument(
        "--dtype",
        default="bfloat16" if cuda else "float32",
        choices=["bfloat16", "float32"],
        help="float32 separates a wrong token from bf16 rounding between near-tied logits",
    )
    ap.add_argument(
        "--sdpa",
        default="auto",
        choices=["auto", "flash", "efficient", "cudnn", "math"],
        help="the compiled step's SDPA kernel (the eager reference keeps auto)",
    )
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = GPT(Config.from_name(args.model)).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.ctx), generator=gen).to(device)
    cases = {
        "dense": ("dense", args.ctx + args.steps + 8, {}),
        "last_recent": ("last_recent", args.ctx // 4, {"sink_tokens": 4}),
        "dense-int8": ("dense", args.ctx + args.steps + 8, {"buffer": "int8"}),
        # fills during the first half of the steps, then evicts: both phases of the score-based step
        "h2o": ("h2o", args.ctx + args.steps // 2, {}),
        "tova": ("tova", args.ctx + args.steps // 2, {}),
        "snapkv": ("snapkv", args.ctx + args.steps // 2, {}),
    }
    for name in args.caches.split(","):
        cache, length, knobs = cases[name]
        model.set_kv_caches(args.batch, cache, length, **knobs)
        eager_tokens, eager_logits, eager_s = greedy(model, prompt, model, args.steps, device)
        skips = counters["inductor"]["cudagraph_skips"]
        model.set_attention_backend(args.sdpa)
        decoder = CompiledDecode(model)
        model.set_attention_backend("auto")  # the prefills stay as the eager reference's
        greedy(model, prompt[:, : min(args.ctx, 256)], decoder, 3, device)  # compile, record the graphs
        compiled_tokens, compiled_logits, compiled_s = greedy(model, prompt, decoder, args.steps, device)
        differs = (compiled_tokens != eager_tokens).any(0).nonzero()
        agree = int(differs[0]) if len(differs) else args.steps
        diff = (compiled_logits[:, :agree] - eager_logits[:, :agree]).abs().max().item() if agree else None
        result = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "model": args.model,
            "ctx": args.ctx,
            "batch": args.batch,
            "cache": cache,
            **knobs,
            "dtype": args.dtype,
            "form": decoder.plan.form,
            "kernel": decoder.plan.kernel,
            "graphs": decoder.plan.graphs,
            "steps_agreeing": agree,
            "of": args.steps,
            "max_logit_diff": diff,
            "eager_ms_p50": statistics.median(eager_s) * 1e3,
            "compiled_ms_p50": statistics.median(compiled_s) * 1e3,
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips,
        }
        print(json.dumps(result), flush=True)
        model.clear_kv_caches()


if __name__ == "__main__":
    main()
