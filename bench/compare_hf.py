"""kvbench and HF transformers side by side: same model shape, context, batch and dtype, one process, one results
folder (a `system` column tells the rows apart).

    python -m bench.compare_hf     # CUDA: llama-3.2-1b, bf16, ctx 32k batch 4 then ctx 8k batch 1
    python -m bench.compare_hf --model tiny --case 1k:1 --systems kvbench,hf_dynamic,hf_static   # a CPU check

Systems:
  kvbench             the harness's job (bench/job.py): dense cache, chunked prefill, decode compiled and
                      captured in CUDA graphs where compile=auto allows it (CUDA), else eager
  hf_static_compiled  StaticCache with `model.forward` compiled, mode="reduce-overhead" (HF's recipe for fast
                      decode; CUDA graphs on CUDA), prefill eager
  hf_static           StaticCache, eager
  hf_dynamic          DynamicCache, eager (what `generate()` uses by default)

Every system: one warm-up (prefill of min(ctx, 2048) tokens + 3 steps), then `--repeats` x (prefill of ctx random
tokens per sequence, one call with logits for the last position only; `--new-tokens` greedy decode steps, each
timed after a device synchronisation). HF's models get their own random weights (timings and memory do not
depend on the values). transformers is an optional dependency (`pip install -e ".[dev]"`).

Memory: on CUDA each system's allocated peak is its own: between systems the compiled code is dropped (its guards
and CUDA graphs can keep a model alive), the allocator's cache emptied and its peak reset, and `alloc_before_bytes`
records what was still allocated when a system started (0 unless something leaked). On the CPU the figure is the
process's peak RSS, and a later system's includes whatever the process kept resident from the earlier ones:
compare CPU memory with `python -m bench.run` (a process per job).
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from bench import measure, results
from bench.nvml_sampler import NvmlSampler

SYSTEMS = ("kvbench", "hf_static_compiled", "hf_static", "hf_dynamic")


def hf_config(cfg, max_positions: int):
    """A transformers config of the same shape as our Config (Llama, or Qwen2 where q/k/v have biases)."""
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_query_groups,
        head_dim=cfg.head_size,
        max_position_embeddings=max(max_positions, cfg.block_size),
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        rope_theta=cfg.rope_base,
    )
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        common["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": r["factor"],
            "low_freq_factor": r["low_freq_factor"],
            "high_freq_factor": r["high_freq_factor"],
            "original_max_position_embeddings": r["original_max_seq_len"],
        }
    if cfg.qkv_bias:
        return transformers.Qwen2Config(**common)
    return transformers.LlamaConfig(**common)


def build_hf(cfg, max_positions: int, dtype: torch.dtype, device: torch.device, seed: int):
    import transformers

    torch.manual_seed(seed)
    hf_cfg = hf_config(cfg, max_positions)
    hf_cfg._attn_implementation = "sdpa"
    cls = transformers.Qwen2ForCausalLM if cfg.qkv_bias else transformers.LlamaForCausalLM
    with torch.device(device):
        model = cls._from_config(hf_cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def _hf_row(system: str, args, cfg, ctx: int, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    identity = {
        "system": system,
        "model": cfg.name,
        "ctx": ctx,
        "batch": batch,
        "dtype": str(dtype),
        "device": device.type,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "seed": args.seed,
        "expandable_segments": args.expandable_segments == "true" and device.type == "cuda",
    }
    return {
        "run_id": os.urandom(8).hex(),
        "sweep_id": args.sweep,
        "config_hash": results.config_hash(identity),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "system": system,
        "device_name": measure.device_name(device),
        "device_kind": device.type,
        "device": device.type,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "model": cfg.name,
        "weights": "random",
        "dtype": str(dtype).removeprefix("torch."),
        "cache": "static" if "static" in system else "dynamic",
        "ctx": ctx,
        "batch": batch,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "seed": args.seed,
        "sdpa_requested": "hf-sdpa",
        "compile": system == "hf_static_compiled",
        "pid": os.getpid(),
        "transformers_version": transformers.__version__,
    }


def run_hf(system: str, args, cfg, ctx: int, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    """One HF transformers configuration, measured the way bench/job.py measures ours."""
    from transformers import DynamicCache, StaticCache

    from bench.job import timing_columns

    row = _hf_row(system, args, cfg, ctx, batch, device, dtype)
    t_start = time.perf_counter()
    model = cache = None
    try:
        model = build_hf(cfg, ctx + args.new_tokens, dtype, device, args.seed)
        row["n_params"] = sum(p.numel() for p in model.parameters())
        row["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
        itemsize = torch.empty((), dtype=dtype).element_size()
        row["kv_bytes_dense"] = cfg.kv_bytes(batch, ctx + args.new_tokens, itemsize)
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        ids = torch.randint(0, cfg.vocab_size, (batch, ctx), generator=gen).to(device)  # (B, ctx)
        step = model.forward
        if system == "hf_static_compiled":
            mode = "reduce-overhead" if device.type == "cuda" else None
            step = torch.compile(model.forward, mode=mode, fullgraph=True)
            row["compile_mode"] = mode or "default"
        # transformers >= 5.2x names the argument `cache` (`past_key_values` is deprecated); older ones do not
        cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        static = None
        if system != "hf_dynamic":
            static = StaticCache(config=model.config, max_cache_len=ctx + args.new_tokens)

        def prefill(prompt: torch.Tensor):
            cache = static if static is not None else DynamicCache()
            if static is not None:
                static.reset()
            positions = torch.arange(prompt.shape[1], device=device)
            out = model(
                input_ids=prompt, cache_position=positions, use_cache=True, logits_to_keep=1, **{cache_arg: cache}
            )
            return out.logits[:, -1:].argmax(-1), cache  # (B, 1)

        def decode(token, cache, start: int, steps: int, times: list[float]):
            for i in range(steps):
                with measure.timed(device, times):
                    if system == "hf_static_compiled" and device.type == "cuda":
                        torch.compiler.cudagraph_mark_step_begin()
                    position = torch.tensor([start + i], device=device)
                    logits = step(input_ids=token, cache_position=position, use_cache=True, **{cache_arg: cache}).logits
                    token = logits[:, -1:].argmax(-1)  # (B, 1)
            return token

        skips_before = counters["inductor"]["cudagraph_skips"]
        with torch.inference_mode():
            warm = min(ctx, 2048)
            warm_steps: list[float] = []
            token, cache = prefill(ids[:, :warm])
            decode(token, cache, warm, 3, warm_steps)
            if system == "hf_static_compiled":
                row["compile_s"] = sum(warm_steps)
                row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips_before
            row["warmup_released_bytes"] = measure.release_warmup_memory(device)  # as the harness does (bench/job.py)
            nvml = None
            if device.type == "cuda" and args.nvml_period_ms > 0:
                torch.cuda.synchronize(device)
                nvml = NvmlSampler(measure.nvml_index(device), args.nvml_period_ms / 1e3).start()
            rss_resettable = measure.reset_peak_rss()
            prefill_s, step_s = [], []
            try:
                with measure.CudaPeaks(device) as peaks:
                    for _ in range(args.repeats):
                        with measure.timed(device, prefill_s):
                            token, cache = prefill(ids)
                        decode(token, cache, ctx, args.new_tokens, step_s)
            finally:
                if nvml is not None:
                    row["peak_nvml_bytes"], row["peak_nvml_source"] = nvml.stop(), nvml.source
        row.update(timing_columns(prefill_s, step_s, batch))
        row["cache_bytes"] = _cache_bytes(cache)
        if device.type == "cuda":
            row.update(
                peak_alloc_bytes=peaks.allocated, peak_reserved_bytes=peaks.reserved, peak_alloc_source="torch.cuda"
            )
            row.update(alloc_conf=args.alloc_conf, expandable_segments=measure.expandable_segments_seen(device))
            _mbu(row, cfg, ctx, args.new_tokens, itemsize, device)
        else:
            row["peak_rss_bytes"] = measure.peak_rss() if rss_resettable else None
            row["rss_file_bytes"] = measure.rss_file() if rss_resettable else None
        row["status"] = "ok"
    except Exception as err:  # noqa: BLE001 - a failure is a row, as in the harness
        from bench.job import is_oom

        row.update(status="oom" if is_oom(err) else "error", error=f"{type(err).__name__}: {err}"[:2000])
    finally:
        model = cache = static = None  # free them before the next system runs
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["total_s"] = time.perf_counter() - t_start
    return row


def _cache_bytes(cache) -> int | None:
    """Bytes of the K/V tensors an HF cache holds now."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total or None


def _mbu(row: dict, cfg, ctx: int, new_tokens: int, itemsize: int, device: torch.device) -> None:
    """As bench/job.py: weights read once (not an untied embedding table) + the K/V attended, per step."""
    from bench.job import mbu_columns

    embedding = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.n_embd * itemsize
    attended = statistics.fmean(ctx + i + 1 for i in range(new_tokens))
    kv = cfg.kv_bytes(row["batch"], 1, itemsize) * attended
    row.update(mbu_columns(row["weights_bytes"] - embedding + kv, row["decode_ms_p50"], device))


def kvbench_spec(args, model: str, ctx: int, batch: int):
    """The harness's job spec for the same shape (dense cache), as `python -m bench.run` would resolve it
    (raises ConfigError with the valid choices for a bad combination of knobs)."""
    from hydra import compose, initialize_config_dir

    from bench.run import CONF_DIR
    from bench.spec import resolve

    overrides = [
        f"model={model}",
        f"ctx={ctx}",
        f"batch={batch}",
        f"dtype={args.dtype}",
        "cache=dense",
        f"new_tokens={args.new_tokens}",
        f"repeats={args.repeats}",
        f"seed={args.seed}",
        f"device={args.device}",
        f"compile={args.compile}",
        f"expandable_segments={args.expandable_segments}",
        f"decode_attention={args.decode_attention}",
        f"sdpa={args.sdpa}",
        f"prefill_chunk={args.prefill_chunk}",
        f"weight_layout={args.weight_layout}",
        *(f"kernel_options.{option}" for option in args.kernel_option or []),
        f"cuda_graphs={args.cuda_graphs}",
        f"nvml_period_ms={args.nvml_period_ms}",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return resolve(compose(config_name="config", overrides=overrides))


def run_kvbench(args, model: str, ctx: int, batch: int) -> dict:
    """The harness's own job for the same shape (dense cache), as `python -m bench.run` would run it."""
    from bench.job import run_job

    spec = kvbench_spec(args, model, ctx, batch)
    identity = {"system": "kvbench", **spec.identity()}
    row = run_job(spec, sweep_id=args.sweep, config_hash=results.config_hash(identity), progress=False)
    row.update(system="kvbench", isolation="none", launcher="compare_hf")
    return row


def clear_previous_system(device: torch.device) -> int | None:
    """Drop what an earlier system left: compiled code (whose guards and CUDA graphs can hold its model alive),
    then the allocator's cache. Returns the bytes still allocated (CUDA), which the next system's allocated peak
    includes: 0 unless something leaked."""
    torch._dynamo.reset()
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device)


def parse_case(text: str) -> tuple[int, int]:
    from bench.spec import parse_ctx

    ctx, _, batch = text.partition(":")
    if not batch.isdigit() or int(batch) < 1:
        raise ValueError(f"--case {text!r} is not valid; valid: CTX:BATCH, e.g. 8k:1 or 32k:4")
    return parse_ctx(ctx), int(batch)


def table(df) -> str:
    """system x (ctx, batch): prefill, decode, weights + dense KV bytes, peak memory against them (allocated on
    CUDA, RSS on CPU), NVML (CUDA) or RSS peak, mbu, decode speed against HF's compiled StaticCache."""
    import pandas as pd

    from bench.report import _fmt, ctx_label, human_bytes

    head = [
        "system",
        "ctx",
        "batch",
        "status",
        "prefill s",
        "ms/step p50",
        "tok/s",
        "w+KV",
        "peak alloc",
        "peak x (w+KV)",
        "peak nvml/rss",
        "mbu",
        "vs hf_static_compiled",
    ]
    lines = []
    df = df.assign(order=df["system"].map({s: i for i, s in enumerate(SYSTEMS)}))
    for (ctx, batch), group in df.sort_values(["ctx", "batch", "order"]).groupby(["ctx", "batch"], sort=False):
        ref = group[(group["system"] == "hf_static_compiled") & (group["status"] == "ok")]["decode_ms_p50"]
        for _, r in group.iterrows():
            total = r["weights_bytes"] + r["kv_bytes_dense"] if pd.notna(r["weights_bytes"]) else None
            peak = r["peak_alloc_bytes"] if r["device_kind"] == "cuda" else r["peak_rss_bytes"]  # like with like
            ratio = peak / total if total and pd.notna(peak) else None
            speed = ref.iloc[0] / r["decode_ms_p50"] if len(ref) and pd.notna(r["decode_ms_p50"]) else None
            other = r["peak_nvml_bytes"] if r["device_kind"] == "cuda" else r["peak_rss_bytes"]
            lines.append(
                [
                    r["system"],
                    ctx_label(int(ctx)),
                    str(batch),
                    r["status"],
                    _fmt(r["prefill_s"], ".3f"),
                    _fmt(r["decode_ms_p50"], ".2f"),
                    _fmt(r["decode_tok_s"], ".1f"),
                    human_bytes(total),
                    human_bytes(r["peak_alloc_bytes"]),
                    _fmt(ratio, ".2f"),
                    human_bytes(other),
                    _fmt(r["mbu"], ".2f"),
                    _fmt(speed, ".2f") + ("x" if speed else ""),
                ]
            )
    widths = [max(len(h), *(len(str(x[i])) for x in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*x) for x in lines])


def main(argv: list[str] | None = None) -> int:
    from bench.spec import DTYPES, ConfigError, KernelOptions
    from model.attention import BACKENDS
    from model.compiled_decode import CUDA_GRAPHS_KNOB, DECODE_ATTENTION
    from model.config import CONFIGS, Config
    from model.gpt import WEIGHT_LAYOUTS

    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(prog="python -m bench.compare_hf", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3.2-1b" if cuda else "tiny", choices=list(CONFIGS))
    ap.add_argument(
        "--case", action="append", help="CTX:BATCH, repeatable (default: 32k:4 then 8k:1 on CUDA, 1k:1 on CPU)"
    )
    ap.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=list(DTYPES))
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument(
        "--systems",
        default="kvbench,hf_static_compiled,hf_dynamic" if cuda else "kvbench,hf_static,hf_dynamic",
        help=f"comma-separated, from: {', '.join(SYSTEMS)}",
    )
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"], help="kvbench's compile knob")
    ap.add_argument("--decode-attention", default="auto", choices=DECODE_ATTENTION,
                    help="kvbench's compiled decode attention (auto: sdpa_gqa on CUDA)")  # fmt: skip
    ap.add_argument("--sdpa", default="auto", choices=[b for b in BACKENDS if b != "eager"],
                    help="kvbench's SDPA kernel (prefill, and the compiled step's sdpa forms)")  # fmt: skip
    ap.add_argument("--prefill-chunk", type=int, default=1024,
                    help="kvbench's prefill chunk (tokens; 1024: the H200 memory figures' setting)")  # fmt: skip
    ap.add_argument("--weight-layout", default="in_out", choices=WEIGHT_LAYOUTS,
                    help="kvbench's weight storage: in_out (x @ W) or out_in (F.linear)")  # fmt: skip
    ap.add_argument("--cuda-graphs", default="auto", choices=CUDA_GRAPHS_KNOB,
                    help="CUDA: kvbench's step captured by us (manual, auto's pick) or by graph trees")  # fmt: skip
    ap.add_argument("--kernel-option", action="append", metavar="KEY=N",
                    help="kvbench's flex or triton decode kernel option, repeatable (e.g. num_stages=3)")  # fmt: skip
    ap.add_argument("--expandable-segments", default="true", choices=["true", "false"],
                    help="CUDA: the caching allocator's expandable segments, for every system of the run")  # fmt: skip
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nvml-period-ms", type=float, default=5.0)
    ap.add_argument("--results-dir", default="results")
    ap.add_argument("--sweep", default="compare_hf")
    args = ap.parse_args(argv)

    def fail(message: str) -> int:
        print(f"kvbench: error: {message}", file=sys.stderr)
        return 2

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or not systems:
        return fail(f"--systems {bad[0] if bad else args.systems!r} is not valid; valid choices: {', '.join(SYSTEMS)}")
    if any(s.startswith("hf") for s in systems):
        try:
            import transformers  # noqa: F401
        except ImportError:
            return fail("the hf_* systems need transformers: pip install -e '.[dev]' (or --systems kvbench)")
    try:
        cases = [parse_case(c) for c in (args.case or (["32k:4", "8k:1"] if cuda else ["1k:1"]))]
    except (ValueError, ConfigError) as err:
        return fail(str(err))
    if args.device == "cuda" and not cuda:
        return fail("--device cuda but no CUDA device is available; valid choices here: auto, cpu")
    if args.new_tokens < 1 or args.repeats < 1 or args.prefill_chunk < 1:
        return fail("--new-tokens, --repeats and --prefill-chunk must be integers >= 1")
    valid_options = list(KernelOptions.__dataclass_fields__)
    for option in args.kernel_option or []:
        key, _, number = option.partition("=")
        if key not in valid_options or not number.isdigit() or int(number) < 1:
            return fail(f"--kernel-option {option!r} is not valid; valid: KEY=N, N >= 1, KEY one of "
                        f"{', '.join(valid_options)}")  # fmt: skip
    device = torch.device("cuda" if (args.device == "auto" and cuda) or args.device == "cuda" else "cpu")
    args.device = device.type
    if args.cuda_graphs == "manual" and device.type != "cuda":
        return fail("--cuda-graphs manual captures kvbench's compiled step on CUDA; valid choices here: trees")
    args.alloc_conf = None
    if device.type == "cuda":  # before anything allocates: one allocator setting for every system of the process
        args.alloc_conf = measure.request_expandable_segments(args.expandable_segments == "true")
    dtype = DTYPES[args.dtype]
    cfg = Config.from_name(args.model)
    if "kvbench" in systems:
        try:  # the knobs checked before anything runs
            kvbench_spec(args, args.model, *cases[0])
        except ConfigError as err:
            return fail(str(err))
    sweep_dir = Path(args.results_dir) / args.sweep
    ran = []
    for ctx, batch in cases:
        for system in systems:
            print(f"== {system} {args.model} ctx={ctx} batch={batch} {args.dtype} {device.type}", flush=True)
            left = clear_previous_system(device)
            if system == "kvbench":
                row = run_kvbench(args, args.model, ctx, batch)
            else:
                row = run_hf(system, args, cfg, ctx, batch, device, dtype)
            row["alloc_before_bytes"] = left
            results.write_row(sweep_dir, row)
            ran.append(row["config_hash"])
            detail = row.get("error") or f"{row.get('decode_ms_p50', float('nan')):.2f} ms/step"
            print(f"   [{row['status']}] {detail}", flush=True)
    df = results.load(sweep_dir)
    df = df[df["config_hash"].isin(ran)]
    print(f"\n{len(df)} rows in {sweep_dir}/\n{table(df)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
