"""Compiled decode step variants side by side, one model and one prefill in one process: which attention
formulation, SDPA kernel, flex options and CUDA-graph capture make the fastest step.

    python benchmarks/decode_variants.py                    # CUDA: llama-3.2-1b bf16, dense, 32k x 4, the default set
    python benchmarks/decode_variants.py --variant flex --variant sdpa_gqa:sdpa=cudnn:graphs=manual
    python benchmarks/decode_variants.py --model tiny --ctx 1024 --batch 2 --variant sdpa --variant sdpa_gqa:sdpa=math

A variant is `ATTENTION[:KEY=VALUE]...`: ATTENTION one of sdpa, sdpa_gqa, flex, triton (model/attention.py,
`static_decode_attention`); keys `sdpa` (the SDPA kernel: auto, flash, efficient, cudnn, math), `graphs` (trees
or manual, CUDA) and the kernel options BLOCK_N, num_stages, num_warps, SPLIT_KV (flex, triton). Each variant
starts from the same prefilled caches at position ctx: compile and warm-up (3 steps); its logits at position ctx
against the eager step's from the same caches (`max_logit_diff`, `logit_scale`, `same_argmax`); `--steps` steps each
synchronised (what the harness reports), the same back to back with one synchronisation (the device-bound
rate), and a few steps under torch.profiler (device time per step, and the share of it in attention kernels).
A variant that fails to compile or run is a row with its error. Prints one JSON line per variant (mbu as the
harness computes it: weights read once plus the filled K/V slots, over the measured device-to-device
bandwidth), with its slowest kernels under --top.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch
from profile_decode import kernel_table, random_model, time_steps  # benchmarks/, beside this script
from torch.profiler import ProfilerActivity, profile

from bench.job import _prefill
from bench.measure import measured_bandwidth, sync
from bench.spec import DTYPES, KernelOptions, parse_ctx
from model.attention import BACKENDS, DECODE_FORMULATIONS
from model.compiled_decode import CUDA_GRAPHS, CompiledDecode
from model.config import CONFIGS
from model.gpt import GPT, WEIGHT_LAYOUTS

CUDA_VARIANTS = [  # each formulation first (flex: the one measured before), then the alternatives; graph trees
    # for flex and triton too, in case manual capture fails. Compiling and capturing flex's step took 27 s on an
    # H200 (results/baselines/h200/, run 2): a run cut short by its time limit loses the last ones.
    "flex",
    "triton:graphs=manual",
    "sdpa_gqa:graphs=manual",
    "triton",
    "flex:graphs=manual",
    "sdpa:graphs=manual",
    "triton:graphs=manual:BLOCK_N=128:num_warps=8",
]
# kernel names that hold attention: flex (inductor's templates are "triton_tem_..."), SDPA's kernels, the softmax
ATTENTION_KERNELS = ("flex", "tem_", "attention", "fmha", "flash", "cudnn", "sdpa", "softmax")


def parse_variant(text: str) -> dict:
    """`sdpa_gqa:sdpa=cudnn:graphs=manual` -> {"attention": "sdpa_gqa", "sdpa": "cudnn", "graphs": "manual",
    "kernel_options": None}; raises ValueError naming the valid choices."""
    attention, *pairs = text.split(":")
    if attention not in DECODE_FORMULATIONS:
        raise ValueError(f"variant {text!r}: {attention!r} is not valid; valid: {', '.join(DECODE_FORMULATIONS)}")
    variant = {"attention": attention, "sdpa": "auto", "graphs": "trees", "kernel_options": None}
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "sdpa" and value in BACKENDS and value != "eager":
            variant["sdpa"] = value
        elif key == "graphs" and value in CUDA_GRAPHS:
            variant["graphs"] = value
        elif key in KernelOptions.__dataclass_fields__ and value.isdigit() and int(value) >= 1:
            options[key] = int(value)
        else:
            valid = ["sdpa=" + "|".join(b for b in BACKENDS if b != "eager"), "graphs=" + "|".join(CUDA_GRAPHS),
                     *(f"{k}=N" for k in KernelOptions.__dataclass_fields__)]  # fmt: skip
            raise ValueError(f"variant {text!r}: {pair!r} is not valid; valid: {', '.join(valid)}")
    variant["kernel_options"] = options or None
    return variant


def attention_share(prof, device: torch.device) -> tuple[float, float]:
    """(device microseconds of all kernels, of the attention kernels) over the profiled steps."""
    total = attention = 0.0
    for event in prof.events():
        if device.type == "cuda" and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.time_range.elapsed_us() if device.type == "cuda" else event.self_cpu_time_total
        total += us
        if any(word in event.name.lower() for word in ATTENTION_KERNELS):
            attention += us
    return total, attention


def rewind(model: GPT, position: int) -> None:
    """Every cache back to `position` (the prefilled length): the next variant decodes the same positions. The
    slots past it hold the previous variant's K/V, which a dense step masks out until it overwrites them."""
    for cache in model.kv_caches:
        cache.next_token_pos = position


def run_variant(text: str, model: GPT, token: torch.Tensor, args, device: torch.device, base: dict) -> dict:
    row = {**base, "variant": text}
    decoder = None
    try:
        variant = parse_variant(text)
        model.set_attention_backend(variant["sdpa"])
        decoder = CompiledDecode(model, attention=variant["attention"], kernel_options=variant["kernel_options"],
                                 graphs=variant["graphs"] if device.type == "cuda" else "trees")  # fmt: skip
        row.update(attention=decoder.attention, kernel=decoder.kernel, graphs=decoder.graphs, mode=decoder.mode)
        pos = args.ctx
        rewind(model, pos)
        t0 = time.perf_counter()
        for _ in range(3):  # compile; CUDA graph trees record on the third call
            token = decoder(token, input_pos=pos)[:, -1:].argmax(-1)  # (B, 1)
            pos += 1
        sync(device)
        row["compile_s"] = time.perf_counter() - t0
        rewind(model, args.ctx)  # the same step, compiled and eager, from the same caches
        compiled = decoder(token, input_pos=args.ctx).float()  # (B, 1, vocab)
        rewind(model, args.ctx)
        eager = model(token, input_pos=args.ctx).float()
        row["max_logit_diff"] = (compiled - eager).abs().max().item()
        row["logit_scale"] = eager.abs().max().item()
        row["same_argmax"] = bool(torch.equal(compiled.argmax(-1), eager.argmax(-1)))
        token, pos, synced, back_to_back = time_steps(decoder, token, args.ctx + 1, args.steps, device)
        row["back_to_back_ms"] = back_to_back * 1e3
        profiled = 8
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(profiled):
                token = decoder(token, input_pos=pos)[:, -1:].argmax(-1)
                pos += 1
            sync(device)
        total, attention = attention_share(prof, device)
        step_ms = statistics.median(synced) * 1e3
        # what the harness counts (bench/job.py, _mbu): weights once, and the filled slots of each step
        length = model.kv_caches[0].cache_length
        attended = statistics.fmean(min(args.ctx + 4 + i, length) for i in range(args.steps))
        kv = sum(c.size_estimate() for c in model.kv_caches) / length * attended
        row.update(ms_p50=step_ms, kernel_ms_per_step=total / profiled / 1e3,
                   attention_ms_per_step=attention / profiled / 1e3,
                   bytes_per_step=base["weights_bytes"] + kv)  # fmt: skip
        if base["bandwidth_bytes_s"]:
            row["mbu"] = row["bytes_per_step"] / (step_ms / 1e3) / base["bandwidth_bytes_s"]
            row["mbu_back_to_back"] = row["bytes_per_step"] / (row["back_to_back_ms"] / 1e3) / base["bandwidth_bytes_s"]
        row["status"] = "ok"
        if args.top:
            row["top"] = [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()}
                          for r in kernel_table(prof, device, profiled)[: args.top]]  # fmt: skip
    except Exception as err:  # noqa: BLE001 - a variant that does not compile or run is a result
        row.update(status="error", error=f"{type(err).__name__}: {err}"[:400])
    finally:
        del decoder
        torch._dynamo.reset()  # the variant's graphs (and CUDA-graph pools) go before the next one compiles
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


@torch.inference_mode()
def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b" if cuda else "tiny", choices=list(CONFIGS))
    ap.add_argument("--ctx", type=parse_ctx, default=32768 if cuda else 1024)
    ap.add_argument("--batch", type=int, default=4 if cuda else 2)
    ap.add_argument("--cache", default="dense", choices=["dense", "last_recent"])
    ap.add_argument("--buffer", default="float", choices=["float", "int8", "int4"])
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=list(DTYPES))
    ap.add_argument(
        "--weight-layout", default="in_out", choices=WEIGHT_LAYOUTS, help="how the Linear weights are stored"
    )
    ap.add_argument("--variant", action="append", help="repeatable; default: a set for CUDA, or sdpa,sdpa_gqa")
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--top", type=int, default=0, help="also list each variant's N slowest kernels")
    ap.add_argument("--pick", metavar="JSONL", help="only print the fastest agreeing variant of an earlier run's "
                    "output: as bench.compare_hf arguments (line 1), as bench.run overrides (line 2), and itself "
                    "(line 3; empty lines if none ran)")  # fmt: skip
    args = ap.parse_args()
    if args.pick:
        rows = [json.loads(line) for line in open(args.pick) if line.startswith("{")]
        best = best_variant(rows)
        print(
            "\n".join(
                [*pick_arguments(parse_variant(best["variant"]) if best else None), best["variant"] if best else ""]
            )
        )
        return
    variants = args.variant or (CUDA_VARIANTS if cuda else ["sdpa", "sdpa_gqa"])
    for text in variants:
        try:
            parse_variant(text)
        except ValueError as err:
            ap.error(str(err))
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype]
    model = random_model(args.model, dtype, device)
    model.set_weight_layout(args.weight_layout)
    cfg = model.config
    room = 3 + 2 * args.steps + 8  # the positions each variant decodes
    length = args.ctx + room if args.cache == "dense" else args.ctx // 4
    model.set_kv_caches(args.batch, args.cache, length, buffer=args.buffer)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.ctx), device=device)  # (B, ctx)
    token = _prefill(model, ids, 2048, None)
    itemsize = torch.empty((), dtype=dtype).element_size()
    embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd * itemsize
    base = {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "model": args.model,
        "ctx": args.ctx, "batch": args.batch, "cache": args.cache, "buffer": args.buffer, "dtype": args.dtype,
        "weight_layout": args.weight_layout,
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()) - embedding,
        "bandwidth_bytes_s": measured_bandwidth(device),
    }  # fmt: skip
    for text in variants:
        print(json.dumps(run_variant(text, model, token, args, device, base)), flush=True)


def best_variant(rows: list[dict], tolerance: float = 0.05) -> dict | None:
    """The fastest variant (synchronised ms/step) whose logits agree with the eager step's to `tolerance` of
    their scale; None if none ran."""
    ok = [r for r in rows if r.get("status") == "ok" and r["max_logit_diff"] <= tolerance * r["logit_scale"]]
    return min(ok, key=lambda r: r["ms_p50"], default=None)


def pick_arguments(variant: dict | None) -> list[str]:
    """[bench.compare_hf arguments, bench.run overrides] that run `variant` (None: the defaults, two empty lines)."""
    if variant is None:
        return ["", ""]
    options = (variant["kernel_options"] or {}).items()
    cli = [f"--decode-attention {variant['attention']}", f"--sdpa {variant['sdpa']}",
           f"--cuda-graphs {variant['graphs']}", *(f"--kernel-option {k}={n}" for k, n in options)]  # fmt: skip
    overrides = [f"decode_attention={variant['attention']}", f"sdpa={variant['sdpa']}",
                 f"cuda_graphs={variant['graphs']}", *(f"kernel_options.{k}={n}" for k, n in options)]  # fmt: skip
    return [" ".join(cli), " ".join(overrides)]


if __name__ == "__main__":
    main()
