"""A decode step's weight products alone, in the two layouts a weight can have: how close each gets to reading the
weights at the measured bandwidth.

    python benchmarks/decode_gemm_layout.py                   # CUDA: Llama-3.2-1B's five weight shapes, bf16, M = 1, 4
    python benchmarks/decode_gemm_layout.py --model tiny      # CPU: a smoke test

A decode step reads every weight once for a handful of rows (M = batch), so its products are matrix-vector-like and
memory-bound. The model stores a weight (in, out) and computes `x @ weight` (model/gpt.py, `Linear`); PyTorch's own
`F.linear` stores (out, in), each output a dot product over one contiguous row. Both are timed per shape, eagerly
and compiled, each call 20 times in one CUDA graph (CUDA) so launches are not counted. Prints one JSON line per
(shape, M, variant): microseconds per call, the weight bytes, and that over the measured device-to-device
bandwidth (`bw_frac`).
"""

from __future__ import annotations

import argparse
import json
from functools import partial

import torch
import torch.nn.functional as F
from decode_attention_tune import timed_us  # benchmarks/, beside this script

from bench.measure import measured_bandwidth
from bench.spec import DTYPES
from model.config import CONFIGS, Config


def weight_shapes(cfg: Config) -> dict[str, tuple[int, int]]:
    """(in, out) of each weight a decode step multiplies by, as model/gpt.py lays them out."""
    hs = cfg.head_size
    return {
        "qkv": (cfg.n_embd, (cfg.n_head + 2 * cfg.n_query_groups) * hs),
        "attn_proj": (cfg.n_head * hs, cfg.n_embd),
        "mlp_fc": (cfg.n_embd, 2 * cfg.intermediate_size),
        "mlp_proj": (cfg.intermediate_size, cfg.n_embd),
        "lm_head": (cfg.n_embd, cfg.vocab_size),
    }


LAYOUT_OF = {"x @ W (in, out)": "in_out", "F.linear (out, in)": "out_in", "compiled x @ W": "in_out",
             "compiled F.linear": "out_in"}  # fmt: skip


def faster_layout(rows: list[dict]) -> str:
    """The layout whose products take less time in all, at the most rows measured, compiled where measured (what
    the compiled step runs); "in_out" (the storage as loaded) on a tie or when nothing ran."""
    timed = [r for r in rows if "us" in r]
    if not timed:
        return "in_out"
    rows_max = max(r["rows"] for r in timed)
    compiled = any(r["variant"].startswith("compiled") for r in timed)
    total = {"in_out": 0.0, "out_in": 0.0}
    for r in timed:
        if r["rows"] == rows_max and r["variant"].startswith("compiled") == compiled:
            total[LAYOUT_OF[r["variant"]]] += r["us"]
    return "out_in" if total["out_in"] < total["in_out"] else "in_out"


def matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x @ weight  # (M, out): the model's Linear


@torch.inference_mode()
def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b" if cuda else "tiny", choices=list(CONFIGS))
    ap.add_argument("--rows", default="1,4", help="M values (the batch), comma-separated")
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=list(DTYPES))
    ap.add_argument("--pick", metavar="JSONL", help="only print the faster layout of an earlier run's output "
                    "(in_out or out_in; in_out if nothing ran)")  # fmt: skip
    args = ap.parse_args()
    if args.pick:
        print(faster_layout([json.loads(line) for line in open(args.pick) if line.startswith("{")]))
        return
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    bandwidth = measured_bandwidth(device)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, (n_in, n_out) in weight_shapes(Config.from_name(args.model)).items():
        weight = torch.randn(n_in, n_out, device=device, dtype=dtype, generator=gen)  # (in, out): the model's
        weight_t = weight.t().contiguous()  # (out, in): F.linear's
        nbytes = weight.numel() * weight.element_size()
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, n_in, device=device, dtype=dtype, generator=gen)
            variants = {
                "x @ W (in, out)": partial(matmul, x, weight),
                "F.linear (out, in)": partial(F.linear, x, weight_t),
            }
            if cuda:  # inductor's choice for each (on the CPU compiling adds nothing to learn here)
                torch._dynamo.reset()
                variants["compiled x @ W"] = partial(torch.compile(matmul), x, weight)
                variants["compiled F.linear"] = partial(torch.compile(F.linear), x, weight_t)
            for variant, fn in variants.items():
                row = {"device": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model, "weight": name,
                       "in": n_in, "out": n_out, "rows": m, "dtype": args.dtype, "variant": variant,
                       "weight_bytes": nbytes}  # fmt: skip
                try:
                    us = timed_us(fn, device)
                    row["us"] = us
                    if bandwidth:
                        row["bw_frac"] = nbytes / (us / 1e6) / bandwidth
                except Exception as e:  # noqa: BLE001 - a variant that fails is a result
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
