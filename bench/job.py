"""One job: build the model and its caches, warm up, then `repeats` x (chunked prefill, timed; `new_tokens` decode
steps, each timed after a device sync), with every memory tracker running. Returns one result row; a failure
(out of memory, an unsupported backend, anything else) is a row with its status, never an exception."""

from __future__ import annotations

import gc
import json
import os
import socket
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench import measure, nvml_sampler
from bench.nvml_sampler import NvmlSampler
from bench.spec import JobSpec
from model.attention import UnsupportedBackend
from model.compiled_decode import CompiledDecode
from model.config import Config
from model.generate import prefill_chunks
from model.gpt import GPT

ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()  # fmt: skip
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def build_model(spec: JobSpec, device: torch.device) -> tuple[GPT, object]:
    """(model, tokenizer or None)."""
    tokenizer = None
    if spec.weights == "pretrained":
        model, tokenizer = _load_pretrained(spec.model, device, spec.torch_dtype)
    else:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(spec.torch_dtype if spec.torch_dtype.is_floating_point else previous)
        try:
            with torch.device(device):
                model = GPT(Config.from_name(spec.model), seed=spec.seed)
        finally:
            torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False), tokenizer


_PRETRAINED: dict[tuple, tuple[GPT, object]] = {}


def _load_pretrained(name: str, device: torch.device, dtype: torch.dtype) -> tuple[GPT, object]:
    """Real weights, dequantized once per process (7 s for SmolLM2 on 2 cores) and reused by later jobs."""
    from model.load import load_pretrained

    key = (name, str(device), dtype)
    if key not in _PRETRAINED:
        _PRETRAINED.clear()  # keep one model at most
        _PRETRAINED[key] = load_pretrained(name, device=device, dtype=dtype)
    model, tokenizer = _PRETRAINED[key]
    model.clear_kv_caches()
    model.set_start_of_layer_hook(None)
    return model, tokenizer


def base_row(spec: JobSpec, sweep_id: str, config_hash: str, probe_device: bool = True) -> dict:
    """The identity and configuration columns of a job's row (`probe_device=False`: no device query, for a
    row the launching process writes about a job whose own process died)."""
    device = torch.device(spec.device)
    return {
        "run_id": os.urandom(8).hex(), "sweep_id": sweep_id, "config_hash": config_hash,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
        "device_name": measure.device_name(device) if probe_device else None, "device_kind": device.type,
        "device": device.type,
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda, "model": spec.model,
        "weights": spec.weights, "dtype": spec.dtype, "cache": spec.cache, "cache_budget": spec.cache_budget,
        "cache_length": spec.cache_length, "cache_kwargs": json.dumps(spec.cache_kwargs, sort_keys=True),
        "ctx": spec.ctx, "batch": spec.batch, "new_tokens": spec.new_tokens, "sdpa_requested": spec.sdpa,
        "prefill_chunk": spec.prefill_chunk, "repeats": spec.repeats, "seed": spec.seed,
        "hostname": socket.gethostname(), "pid": os.getpid(),
    }  # fmt: skip


def run_job(spec: JobSpec, sweep_id: str, config_hash: str, progress: bool = True) -> dict:
    device = torch.device(spec.device)
    alloc_conf = measure.request_expandable_segments(spec.expandable_segments) if device.type == "cuda" else None
    row = base_row(spec, sweep_id, config_hash)  # (queries the device: the allocator's setting must come first)
    row["alloc_conf"] = alloc_conf
    t_start = time.perf_counter()
    try:
        _measure(spec, device, row, progress)
        row["status"] = "ok"
    except UnsupportedBackend as err:
        row.update(status="unsupported", error=str(err))
    except Exception as err:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
        status = "oom" if is_oom(err) else "error"
        row.update(status=status, error=f"{type(err).__name__}: {err}".strip()[:2000])
    finally:
        if spec.compile:  # its compiled code and CUDA-graph pools go, and the next job in this process (isolate=false)
            torch._dynamo.reset()  # does not count against dynamo's recompile limit (8 variants of the step)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["total_s"] = time.perf_counter() - t_start
    return row


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1, keepdim=True)  # (B, 1)


def _prefill(model: GPT, ids: torch.Tensor, chunk: int, bar_desc: str | None) -> torch.Tensor:
    """Chunked prefill; returns the next token (B, 1). Only the last position goes through the output head."""
    bounds = prefill_chunks(model, ids.shape[1], chunk)
    hidden = None
    show = bar_desc is not None and len(bounds) >= 4
    for start, end in tqdm(bounds, desc=bar_desc, leave=False, disable=None if show else True):
        hidden = model(ids[:, start:end], input_pos=start, skip_lm_head=True)  # (B, end - start, n_embd)
    return _argmax(model.lm_head(hidden[:, -1]))


def _used(model: GPT) -> set[str]:
    """Attention backends that ran since the last call, over all layers."""
    seen = set().union(*(c.backends_seen for c in model.kv_caches))
    for c in model.kv_caches:
        c.backends_seen.clear()
    return seen


@torch.inference_mode()
def _measure(spec: JobSpec, device: torch.device, row: dict, progress: bool) -> None:
    if spec.threads:
        torch.set_num_threads(spec.threads)
    row["threads"] = torch.get_num_threads()
    nvml_baseline = None
    if device.type == "cuda":
        row["driver_version"] = nvml_sampler.driver_version()
        row["nvml_index"] = measure.nvml_index(device)
        nvml_baseline = nvml_sampler.device_used(row["nvml_index"])  # the level before the run
    torch.manual_seed(spec.seed)
    model, tokenizer = build_model(spec, device)
    model.set_weight_layout(spec.weight_layout)
    row["weight_layout"] = spec.weight_layout
    cfg = model.config
    itemsize = torch.empty((), dtype=spec.torch_dtype).element_size()
    row["n_params"] = sum(p.numel() for p in model.parameters())
    row["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    row["kv_bytes_dense"] = cfg.kv_bytes(spec.batch, spec.ctx + spec.new_tokens, itemsize)
    model.set_kv_caches(spec.batch, spec.cache, spec.cache_length, **spec.cache_kwargs)
    model.set_attention_backend(spec.sdpa)
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    ids = torch.randint(0, cfg.vocab_size, (spec.batch, spec.ctx), generator=gen).to(device)  # (B, ctx)
    if spec.inject == "oom":
        raise torch.OutOfMemoryError("injected out-of-memory (inject=oom)")
    if spec.inject == "error":
        raise RuntimeError("injected failure (inject=error)")

    row["cache_bytes"] = sum(c.size_estimate() for c in model.kv_caches)
    if spec.repeats > 0:  # repeats=0: a quality-only run
        _timed(spec, model, ids, device, row, progress, nvml_baseline)
        if device.type == "cuda":
            _mbu(spec, model, row, itemsize, device)
        elif spec.track_tensors:
            _tracked_pass(spec, model, ids, row)
    if spec.evals:
        _quality(spec, model, tokenizer, row)


def _timed(
    spec: JobSpec, model: GPT, ids: torch.Tensor, device: torch.device, row: dict, progress: bool, nvml_baseline
) -> None:
    """Warm-up, then `repeats` x (chunked prefill, `new_tokens` decode steps), every tracker running."""

    step = model
    row["compile"] = spec.compile
    skips_before = 0
    if spec.compile:  # the decode step compiled (and captured in CUDA graphs on CUDA); prefill stays eager
        from torch._dynamo.utils import counters  # here: importing the compiler costs eager jobs 140 MiB of RSS

        skips_before = counters["inductor"]["cudagraph_skips"]
        step = CompiledDecode(model, attention=spec.decode_attention, kernel_options=spec.kernel_options,
                              graphs=spec.cuda_graphs or "trees")  # fmt: skip
        row["compile_mode"] = step.mode or "default"
        row["cuda_graphs"] = step.graphs
        row["decode_attention"] = step.attention
        row["decode_kernel"] = step.kernel
        if step.kernel_options:
            row["kernel_options"] = ",".join(f"{k}={v}" for k, v in step.kernel_options.items())

    def decode(token: torch.Tensor, start: int, steps: int, times: list[float], desc: str | None) -> torch.Tensor:
        for i in tqdm(range(steps), desc=desc, leave=False, disable=None if desc else True):
            with measure.timed(device, times):
                token = _argmax(step(token, input_pos=start + i)[:, -1])
        return token

    if spec.warmup or spec.compile:  # first calls pay for lazy initialisation, kernel selection, allocator growth
        warm = min(spec.ctx, spec.prefill_chunk)  # and compilation (CUDA graphs are recorded on the third call)
        warm_steps: list[float] = []
        decode(_prefill(model, ids[:, :warm], spec.prefill_chunk, None), warm, 3 if spec.compile else 2, warm_steps,
               None)  # fmt: skip
        if spec.compile:
            row["compile_s"] = sum(warm_steps)
            # CUDA graphs that inductor declined to record (reduce-overhead then runs the compiled kernels unrecorded)
            row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips_before

    for c in model.kv_caches:  # the warm-up's backends are not the measured phases'
        c.backends_seen.clear()
    row["warmup_released_bytes"] = measure.release_warmup_memory(device)
    nvml = None
    if device.type == "cuda" and spec.nvml_period_ms > 0:
        torch.cuda.synchronize(device)
        nvml = NvmlSampler(row["nvml_index"], spec.nvml_period_ms / 1e3, baseline_used=nvml_baseline).start()
    rss_resettable = measure.reset_peak_rss()
    prefill_s: list[float] = []
    step_s: list[float] = []
    peaks = {"prefill": [0, 0], "decode": [0, 0]}
    prefill_backends, decode_backends = set(), set()
    try:
        for r in range(spec.repeats):
            label = f"repeat {r + 1}/{spec.repeats}" if progress else None
            with measure.CudaPeaks(device) as p, measure.timed(device, prefill_s):
                token = _prefill(model, ids, spec.prefill_chunk, label and f"prefill {label}")
            peaks["prefill"] = [max(peaks["prefill"][0], p.allocated or 0), max(peaks["prefill"][1], p.reserved or 0)]
            prefill_backends |= _used(model)
            with measure.CudaPeaks(device) as p:
                decode(token, spec.ctx, spec.new_tokens, step_s, label and f"decode {label}")
            peaks["decode"] = [max(peaks["decode"][0], p.allocated or 0), max(peaks["decode"][1], p.reserved or 0)]
            decode_backends |= _used(model)
    finally:
        if nvml is not None:
            row["peak_nvml_bytes"] = nvml.stop()
            row["peak_nvml_source"] = nvml.source
    row["peak_rss_bytes"] = measure.peak_rss() if rss_resettable else None
    row["rss_file_bytes"] = measure.rss_file() if rss_resettable else None
    row["sdpa_used_prefill"] = "+".join(sorted(prefill_backends))
    row["sdpa_used_decode"] = "+".join(sorted(decode_backends))
    same = row["sdpa_used_prefill"] == row["sdpa_used_decode"]
    row["sdpa_used"] = row["sdpa_used_decode"] if same else f"{row['sdpa_used_prefill']}|{row['sdpa_used_decode']}"
    row.update(timing_columns(prefill_s, step_s, spec.batch))
    if device.type == "cuda":
        row["peak_alloc_source"] = "torch.cuda"
        row["peak_alloc_prefill_bytes"], row["peak_alloc_decode_bytes"] = peaks["prefill"][0], peaks["decode"][0]
        row["peak_alloc_bytes"] = max(peaks["prefill"][0], peaks["decode"][0])
        row["peak_reserved_bytes"] = max(peaks["prefill"][1], peaks["decode"][1])
        row["expandable_segments"] = measure.expandable_segments_seen(device)


def _quality(spec: JobSpec, model: GPT, tokenizer, row: dict) -> None:
    """The selected quality evaluations, on fresh caches of the same kind and size."""
    from bench import quality

    knobs = spec.eval_knobs
    setup = quality.CacheSetup(spec.cache, spec.cache_kwargs, spec.cache_length)
    row["eval"] = "+".join(spec.evals)
    if "fidelity" in spec.evals:
        row.update(quality.fidelity(model, tokenizer, setup, spec.ctx, knobs["tokens"], spec.prefill_chunk))
    if "passkey" in spec.evals:
        result = quality.passkey(model, tokenizer, setup, spec.ctx, knobs["depths"], knobs["trials"], knobs["seed"],
                                 knobs["question"], spec.prefill_chunk)  # fmt: skip
        row["passkey_acc"] = result["passkey_acc"]
        row["passkey_by_depth"] = json.dumps(result["passkey_by_depth"])
        row["eval_question"] = knobs["question"]
    if "ppl" in spec.evals:
        row.update(quality.perplexity(model, tokenizer, setup, spec.ctx, knobs["ppl_chunk"]))


def timing_columns(prefill_s: list[float], step_s: list[float], batch: int) -> dict:
    """prefill (median, min) and decode step (p50, p90, mean, tokens/s) columns from the timed seconds."""
    step_ms = sorted(t * 1e3 for t in step_s)
    return {
        "prefill_s": statistics.median(prefill_s), "prefill_s_min": min(prefill_s),
        "decode_ms_p50": statistics.median(step_ms),
        "decode_ms_p90": step_ms[min(len(step_ms) - 1, int(round(0.9 * (len(step_ms) - 1))))],
        "decode_ms_mean": statistics.fmean(step_ms), "decode_tok_s": batch * len(step_s) / sum(step_s),
    }  # fmt: skip


def mbu_columns(bytes_per_step: float, step_ms: float, device: torch.device) -> dict:
    """Achieved bytes/s of a decode step over the device-to-device bandwidth measured once per device."""
    bandwidth = measure.measured_bandwidth(device)
    return {"bandwidth_bytes_s": bandwidth, "mbu": bytes_per_step / (step_ms / 1e3) / bandwidth}


def _mbu(spec: JobSpec, model: GPT, row: dict, itemsize: int, device: torch.device) -> None:
    """A decode step must read the weights once (not the embedding table: one row per token) and the K/V it
    attends, in the cache's own bytes per slot (int8/int4 read less)."""
    weights = row["weights_bytes"] - (model.wte.weight.numel() * itemsize if model.wte is not None else 0)
    attended = statistics.fmean(min(spec.ctx + i + 1, spec.cache_length) for i in range(spec.new_tokens))
    kv = row["cache_bytes"] / spec.cache_length * attended
    row.update(mbu_columns(weights + kv, row["decode_ms_p50"], device))


def _tracked_pass(spec: JobSpec, model: GPT, ids: torch.Tensor, row: dict) -> None:
    """One more prefill + decode, untimed, under the exact tensor tracker: peak live tensor bytes (weights, caches
    and inputs included), per phase. Deterministic for a given config, so CI compares it exactly."""
    baseline = row["weights_bytes"] + sum(c.size_estimate() for c in model.kv_caches) + ids.numel() * ids.element_size()
    baseline += sum(b.numel() * b.element_size() for b in model.buffers() if not _is_cache_buffer(model, b))
    # compile=true: the same fixed-shape step, run eagerly (the tracker counts ops as they run; compiled code
    # would hide its intermediate buffers from it)
    step = CompiledDecode(model, compile=False, attention=spec.decode_attention,
                          kernel_options=spec.kernel_options) if spec.compile else model  # fmt: skip
    tracker = measure.TensorTracker(baseline=baseline)
    with tracker:
        token = _prefill(model, ids, spec.prefill_chunk, None)
        row["peak_alloc_prefill_bytes"] = tracker.peak
        tracker.reset_peak()
        for i in range(spec.new_tokens):
            token = _argmax(step(token, input_pos=spec.ctx + i)[:, -1])
        row["peak_alloc_decode_bytes"] = tracker.peak
    row["peak_tracked_bytes"] = max(row["peak_alloc_prefill_bytes"], row["peak_alloc_decode_bytes"])
    row["peak_alloc_bytes"] = row["peak_tracked_bytes"]
    row["peak_alloc_source"] = "tensor_tracker"


def _is_cache_buffer(model: GPT, buffer: torch.Tensor) -> bool:
    return any(buffer is b for c in model.kv_caches for b in c.buffers())
