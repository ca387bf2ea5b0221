"""One job: build the system (a model and its caches), warm up, then `repeats` x (a prefill, timed; `new_tokens`
decode steps, each timed after a device sync), with every memory tracker running. Returns one result row; a
failure (out of memory, an unsupported combination, anything else) is a row with its status, never an exception.

Each part of the row is a dataclass of bench/results/schema.py (`Identity`, `Configuration`, `Timing`, `Memory`, ...),
filled by what measures it; the row is their fields merged.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import statistics
import subprocess
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench import systems
from bench.config.spec import JobSpec
from bench.measure import memory as trackers
from bench.measure import nvml_sampler
from bench.measure.contention import Contention, ContentionMonitor, classify, cores_allowed, others_busy
from bench.measure.nvml_sampler import NvmlSampler
from bench.measure.timing import median_interval, timed
from bench.results import records
from bench.results.schema import (
    SCHEMA_VERSION,
    Bytes,
    Configuration,
    Identity,
    Memory,
    Outcome,
    Roofline,
    SystemColumns,
    Timing,
)
from model.attention import UnsupportedBackend, record_backends

ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        status = ["git", "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, cwd=ROOT, capture_output=True, text=True, timeout=5).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def configuration(spec: JobSpec) -> Configuration:
    """The configuration columns, with the row's labels from its system's class."""
    cls = systems.system_class(spec.system.name)
    label_args = (spec.cache.name, spec.cache.kwargs, spec.system.knobs)
    label, method = cls.label(*label_args), cls.method(*label_args)
    if spec.cache.decode != cls.decode_modes[0]:  # the system's other mode, named: `knorm+append`
        label, method = f"{label}+{spec.cache.decode}", f"{method}+{spec.cache.decode}"
    return Configuration(
        system=spec.system.name,
        system_kwargs=json.dumps(spec.system.knobs, sort_keys=True) if spec.system.knobs else None,
        model=spec.model,
        weights=spec.weights,
        dtype=spec.dtype,
        cache=spec.cache.name,
        cache_budget=spec.cache.budget,
        cache_length=spec.cache.length,
        cache_kwargs=json.dumps(spec.cache.kwargs, sort_keys=True),
        ctx=spec.ctx,
        batch=spec.batch,
        new_tokens=spec.new_tokens,
        sdpa_requested=spec.sdpa,
        prefill_chunk=spec.prefill_chunk,
        repeats=spec.repeats,
        seed=spec.seed,
        label=label,
        method=method,
        peer=cls.peer(*label_args),
        threads=spec.threads,
        decode=spec.cache.decode,
    )


def base_row(spec: JobSpec, sweep_id: str, config_hash: str, probe_device: bool = True) -> dict:
    """The identity and configuration columns of a job's row (`probe_device=False`: no device query, for a
    row the launching process writes about a job whose own process died)."""
    device = torch.device(spec.device)
    identity = Identity(
        schema_version=SCHEMA_VERSION,
        run_id=os.urandom(8).hex(),
        sweep_id=sweep_id,
        config_hash=config_hash,
        started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        git_commit=git_commit(),
        device_name=trackers.device_name(device) if probe_device else None,
        device_kind=device.type,
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        hostname=socket.gethostname(),
        pid=os.getpid(),
        slurm_job_id=os.environ.get("SLURM_JOB_ID"),
        slurm_array_task_id=os.environ.get("SLURM_ARRAY_TASK_ID"),
    )
    return {**asdict(identity), **asdict(configuration(spec))}


def run_job(spec: JobSpec, sweep_id: str, config_hash: str, progress: bool = True) -> dict:
    device = torch.device(spec.device)
    alloc_conf = trackers.request_expandable_segments(spec.expandable_segments) if device.type == "cuda" else None
    row = base_row(spec, sweep_id, config_hash)  # (queries the device: the allocator's setting must come first)
    row["alloc_conf"] = alloc_conf
    t_start = time.perf_counter()
    try:
        refused = _idle(spec, row)
        if refused:
            row.update(asdict(Outcome("busy", refused, time.perf_counter() - t_start)))
            return row
        row.update(_measure(spec, device, progress, records.folder(Path(spec.results_dir) / sweep_id, config_hash)))
        row["status"] = "ok"
    except UnsupportedBackend as err:
        row.update(asdict(Outcome("unsupported", str(err))))
    except Exception as err:  # noqa: BLE001 - every failure becomes a row; the sweep goes on
        if type(err).__name__ == "UncompletedJobError":
            raise  # the scheduler ends this job (time limit, preemption): it leaves no row, and the rerun redoes it
        status = "oom" if is_oom(err) else "error"
        row.update(asdict(Outcome(status, f"{type(err).__name__}: {err}".strip()[:2000])))
    finally:
        if spec.compile:  # its compiled code and CUDA-graph pools go, and the next job in this process (isolate=false)
            torch._dynamo.reset()  # does not count against dynamo's recompile limit
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    row["total_s"] = time.perf_counter() - t_start
    return row


def _idle(spec: JobSpec, row: dict) -> str | None:
    """Before measuring: is anything else using the CPUs? One line if so; with idle_policy=wait, wait (up to
    idle_timeout_s) for them to be quiet; with refuse, the reason not to measure (a `busy` row)."""
    threads = spec.threads or torch.get_num_threads()
    cores = cores_allowed()
    busy = others_busy(0.25)
    level, _ = classify(busy, cores, threads, None)
    row["idle_wait_s"] = 0.0
    if level == "none":
        return None
    why = (
        f"the machine is busy: other processes use {busy:.1f} of the {cores} cores this job may use (it runs "
        f"{threads} threads)"
    )
    if spec.idle_policy == "refuse":
        print(f"[busy] {why}: not measured (idle_policy=refuse)", flush=True)
        return why
    if spec.idle_policy == "wait":
        t0 = time.perf_counter()
        while level != "none" and time.perf_counter() - t0 < spec.idle_timeout_s:
            level, _ = classify(others_busy(1.0), cores, threads, None)
        row["idle_wait_s"] = time.perf_counter() - t0
        if level == "none":
            return None
        why += f", still after {row['idle_wait_s']:.0f} s"
    print(f"[busy] {why}: its timings will show it (the row's `contention` says how much)", flush=True)
    return None


@torch.inference_mode()
def _measure(spec: JobSpec, device: torch.device, progress: bool, answers: Path) -> dict:
    """Every phase the spec asks for; returns their columns. `answers`: the task suite's records folder."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    row: dict = {"threads": torch.get_num_threads()}
    nvml_baseline = None
    if device.type == "cuda":
        row["driver_version"] = nvml_sampler.driver_version()
        row["nvml_index"] = trackers.nvml_index(device)
        nvml_baseline = nvml_sampler.device_used(row["nvml_index"])  # the level before the run
    if spec.memory_limit is not None and device.type == "cuda":  # beyond it, allocating is an out-of-memory error
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.memory_limit / total), device)
        row["memory_limit_bytes"] = spec.memory_limit
    torch.manual_seed(spec.seed)
    system = systems.create(spec, device)
    params = list(system.model.parameters())
    itemsize = torch.empty((), dtype=spec.torch_dtype).element_size()
    row.update(asdict(SystemColumns(**system.columns())))
    row["prefill_chunk"] = system.prefill_chunk
    sizes = Bytes(
        n_params=sum(p.numel() for p in params),
        weights_bytes=sum(p.numel() * p.element_size() for p in params),
        kv_bytes_dense=system.config.kv_bytes(spec.batch, spec.ctx + spec.new_tokens, itemsize),
    )
    gen = torch.Generator(device="cpu").manual_seed(spec.seed)
    ids = torch.randint(0, system.config.vocab_size, (spec.batch, spec.ctx), generator=gen).to(device)  # (B, ctx)
    if spec.inject == "oom":
        raise torch.OutOfMemoryError("injected out-of-memory (inject=oom)")
    if spec.inject == "error":
        raise RuntimeError("injected failure (inject=error)")
    memory = Memory()
    if spec.repeats > 0:  # repeats=0: a quality-only run
        timing_, memory, seen, sizes.cache_bytes_prefill = _timed(
            spec, system, ids, device, progress, nvml_baseline, row.get("nvml_index")
        )
        row.update(asdict(timing_), **asdict(seen))
        if device.type == "cuda":
            row.update(asdict(_roofline(spec, system, timing_, device)))
        elif spec.track_tensors:
            tracked = _tracked_peak(spec, system, ids)
            tracked.peak_rss_bytes, tracked.rss_file_bytes = memory.peak_rss_bytes, memory.rss_file_bytes
            memory = tracked
    elif not system.allocates_up_front:  # a quality-only run: caches that exist once a prompt went through them
        system.prefill(ids)
        sizes.cache_bytes_prefill = system.cache_bytes()
    sizes.cache_bytes = system.cache_bytes()
    for phase in ("prefill", "decode"):  # the peak split: weights + cache bytes + what the phase held beyond them
        peak = getattr(memory, f"peak_alloc_{phase}_bytes")
        transient = None if peak is None else peak - sizes.weights_bytes - sizes.cache_bytes
        setattr(memory, f"transient_{phase}_bytes", transient)
    row.update(asdict(sizes), **asdict(memory))
    if spec.eval.evals:
        from bench.eval import quality

        row.update(quality.evaluate(spec, system, answers, answers.name).columns())
    return row


def _timed(
    spec: JobSpec, system, ids: torch.Tensor, device: torch.device, progress: bool, nvml_baseline, nvml_index
) -> tuple[Timing, Memory, Contention, int | None]:
    """Warm-up, then `repeats` x (prefill, `new_tokens` decode steps), every tracker running. Returns also what the
    caches held right after the last prefill."""

    def decode(token: torch.Tensor, start: int, steps: int, times: list[float], desc: str | None) -> torch.Tensor:
        for i in tqdm(range(steps), desc=desc, leave=False, disable=None if desc else True):
            with timed(device, times):
                token = system.decode(token, start + i)
        return token

    compile_s = skips = None
    if spec.warmup or spec.compile:  # first calls pay for lazy initialisation, kernel selection, allocator growth
        skips_before = _cudagraph_skips() if spec.compile else 0  # and compilation (graphs recorded on the 3rd call)
        # one prefill call (another library's: the whole prompt), then the steps, within the tokens the caches hold
        steps = 3 if spec.compile else 2
        warm = max(1, min(spec.ctx, system.prefill_chunk, spec.ctx + spec.new_tokens - steps))
        warm_steps: list[float] = []
        decode(system.prefill(ids[:, :warm]), warm, min(steps, spec.ctx + spec.new_tokens - warm), warm_steps, None)
        if spec.compile:
            compile_s, skips = sum(warm_steps), _cudagraph_skips() - skips_before
    system.release_decoded()  # the warm-up's decoded tokens: not held through what is measured
    memory = Memory(warmup_released_bytes=trackers.release_warmup_memory(device))
    nvml = None
    if device.type == "cuda" and spec.nvml_period_ms > 0:
        torch.cuda.synchronize(device)
        nvml = NvmlSampler(nvml_index, spec.nvml_period_ms / 1e3, baseline_used=nvml_baseline).start()
    rss_resettable = trackers.reset_peak_rss()
    monitor = ContentionMonitor(torch.get_num_threads(), nvml_index).start()
    prefill_s: list[float] = []
    step_s: list[float] = []
    peaks = {"prefill": [0, 0], "decode": [0, 0]}
    used = {"prefill": set(), "decode": set()}
    after_prefill = None
    try:
        for r in range(spec.repeats):
            label = f"repeat {r + 1}/{spec.repeats}" if progress else None
            system.release_decoded()  # the previous repeat's (the last one's stay: `cache_bytes` counts them)
            with trackers.CudaPeaks(device) as p, timed(device, prefill_s), record_backends() as seen:
                token = system.prefill(ids, label and f"prefill {label}")
            peaks["prefill"] = [max(peaks["prefill"][0], p.allocated or 0), max(peaks["prefill"][1], p.reserved or 0)]
            used["prefill"] |= seen
            after_prefill = system.cache_bytes()
            with trackers.CudaPeaks(device) as p, record_backends() as seen:
                decode(token, spec.ctx, spec.new_tokens, step_s, label and f"decode {label}")
            peaks["decode"] = [max(peaks["decode"][0], p.allocated or 0), max(peaks["decode"][1], p.reserved or 0)]
            used["decode"] |= seen
    finally:
        seen = monitor.stop()
        if nvml is not None:
            memory.peak_nvml_bytes = nvml.stop()
            memory.peak_nvml_source = nvml.source
    if rss_resettable:
        memory.peak_rss_bytes, memory.rss_file_bytes = trackers.peak_rss(), trackers.rss_file()
    if device.type == "cuda":
        memory.peak_alloc_prefill_bytes, memory.peak_alloc_decode_bytes = peaks["prefill"][0], peaks["decode"][0]
        memory.peak_alloc_bytes = max(peaks["prefill"][0], peaks["decode"][0])
        memory.peak_alloc_source = "torch.cuda"
        memory.peak_reserved_bytes = max(peaks["prefill"][1], peaks["decode"][1])
        memory.expandable_segments = trackers.expandable_segments_seen(device)
    return timing(prefill_s, step_s, spec.batch, used, compile_s, skips), memory, seen, after_prefill


def timing(
    prefill_s: list[float], step_s: list[float], batch: int, used: dict[str, set[str]], compile_s=None, skips=None
) -> Timing:
    """The timed seconds (every prefill, every decode step) and the backends each phase used, as a Timing."""
    names = {phase: "+".join(sorted(seen)) for phase, seen in used.items()}
    same = names["prefill"] == names["decode"]
    step_ms = sorted(t * 1e3 for t in step_s)
    return Timing(
        prefill_s=statistics.median(prefill_s),
        prefill_s_min=min(prefill_s),
        decode_ms_p50=statistics.median(step_ms),
        decode_ms_p90=step_ms[min(len(step_ms) - 1, int(round(0.9 * (len(step_ms) - 1))))],
        decode_ms_mean=statistics.fmean(step_ms),
        decode_tok_s=batch * len(step_s) / sum(step_s),
        sdpa_used_prefill=names["prefill"],
        sdpa_used_decode=names["decode"],
        sdpa_used=names["decode"] if same else f"{names['prefill']}|{names['decode']}",
        compile_s=compile_s,
        cudagraph_skips=skips,
        prefill_cv=statistics.stdev(prefill_s) / statistics.fmean(prefill_s) if len(prefill_s) > 1 else None,
        decode_cv=statistics.stdev(step_ms) / statistics.fmean(step_ms) if len(step_ms) > 1 else None,
        **dict(zip(("decode_ms_p50_low", "decode_ms_p50_high"), median_interval(step_ms))),
    )


def _cudagraph_skips() -> int:
    from torch._dynamo.utils import counters  # here: an eager job's process never loads the compiler

    return counters["inductor"]["cudagraph_skips"]


def _roofline(spec: JobSpec, system, timed: Timing, device: torch.device) -> Roofline:
    """A decode step must read the weights once and the K/V it attends, in the cache's own bytes per slot (int8/int4
    read less)."""
    attended = statistics.fmean(min(spec.ctx + i + 1, system.kv_slots) for i in range(spec.new_tokens))
    step_bytes = system.read_bytes_per_token() + system.cache_bytes() / system.kv_slots * attended
    return roofline(step_bytes, timed.decode_ms_p50, device)


def roofline(step_bytes: float, step_ms: float, device: torch.device) -> Roofline:
    """Achieved bytes/s of a decode step over the device-to-device bandwidth measured once per device."""
    bandwidth = trackers.measured_bandwidth(device)
    return Roofline(bandwidth, step_bytes / (step_ms / 1e3) / bandwidth)


def _tracked_peak(spec: JobSpec, system, ids: torch.Tensor) -> Memory:
    """One more prefill + decode, untimed, under the exact tensor tracker: peak live tensor bytes (weights, caches
    and inputs included), per phase. Deterministic for a given config, so CI compares it exactly."""
    system.release_decoded()  # the timed repeats' decoded tokens: the tracked pass decodes its own
    tracker = trackers.TensorTracker(baseline=system.resident_bytes() + ids.numel() * ids.element_size())
    with tracker, system.eager_steps():
        token = system.prefill(ids)
        prefill_peak = tracker.peak
        tracker.reset_peak()
        for i in range(spec.new_tokens):
            token = system.decode(token, spec.ctx + i)
        decode_peak = tracker.peak
    return Memory(
        peak_alloc_bytes=max(prefill_peak, decode_peak),
        peak_alloc_prefill_bytes=prefill_peak,
        peak_alloc_decode_bytes=decode_peak,
        peak_alloc_source="tensor_tracker",
    )
