"""Result rows: the schema, atomic one-file-per-job writes, loading a folder tree, resume by config hash.

Reads and writes parquet with pandas/pyarrow only (no torch): plots and regression checks run where the model
does not.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from bench.eval.tasks import TASKS

if TYPE_CHECKING:  # pandas is imported where frames are made: a job's own process writes no frame and never loads it
    import pandas as pd

# Version 2 dropped columns that always held another column's value (`device`: device_kind; `peak_tracked_bytes`:
# peak_alloc_bytes where peak_alloc_source is tensor_tracker) and settings that left the harness (`compile_mode`,
# `kernel_options`, `weight_layout`). `load` reads rows of every version as version 2.
SCHEMA_VERSION = 2
DROPPED = {
    "device": "device_kind",
    "peak_tracked_bytes": "peak_alloc_bytes",
    "compile_mode": None,
    "kernel_options": None,
    "weight_layout": None,
}  # column -> the column that holds its value (None: gone)

# The schema of docs/design.md (never rename these; add columns freely). Values: the pandas dtype of the column.
SCHEMA: dict[str, str] = {
    # identity
    "run_id": "string",
    "sweep_id": "string",
    "config_hash": "string",
    "started_at": "string",
    "git_commit": "string",
    "device_name": "string",
    "device_kind": "string",
    "driver_version": "string",
    "torch_version": "string",
    "cuda_version": "string",
    # config
    "model": "string",
    "n_params": "Int64",
    "dtype": "string",
    "cache": "string",
    "cache_budget": "Int64",
    "cache_kwargs": "string",
    "ctx": "Int64",
    "batch": "Int64",
    "new_tokens": "Int64",
    "sdpa_requested": "string",
    "sdpa_used": "string",
    "prefill_chunk": "Int64",
    "repeats": "Int64",
    "seed": "Int64",
    # status
    "status": "string",
    "error": "string",
    # time
    "prefill_s": "float64",
    "decode_ms_p50": "float64",
    "decode_ms_p90": "float64",
    "decode_tok_s": "float64",
    "total_s": "float64",
    # memory (bytes)
    "weights_bytes": "Int64",
    "kv_bytes_dense": "Int64",
    "cache_bytes": "Int64",
    "peak_alloc_bytes": "Int64",
    "peak_reserved_bytes": "Int64",
    "peak_nvml_bytes": "Int64",
    "peak_rss_bytes": "Int64",
    # derived
    "mbu": "float64",
    # quality
    "kl_vs_dense": "float64",
    "top1_agree": "float64",
    "passkey_acc": "float64",
    "ppl": "float64",
}

# Columns beyond the design's list that the harness writes.
EXTRA: dict[str, str] = {
    "schema_version": "Int64",
    "system": "string",  # kvbench | hf_dynamic | hf_static | hf_static_compiled | hf_quantized | ... (bench/systems)
    "system_kwargs": "string",  # JSON: the system's own knobs (hf_quantized's nbits, kvpress's press)
    "weights": "string",  # random | pretrained
    "cache_length": "Int64",  # slots per sequence and KV head actually allocated
    "sdpa_used_prefill": "string",
    "sdpa_used_decode": "string",
    "prefill_s_min": "float64",
    "decode_ms_mean": "float64",
    "peak_alloc_source": "string",  # torch.cuda | tensor_tracker (CPU: exact peak of live tensor bytes)
    "peak_alloc_prefill_bytes": "Int64",
    "peak_alloc_decode_bytes": "Int64",
    "cache_bytes_prefill": "Int64",  # the caches' bytes right after a timed prefill (cache_bytes: after decoding)
    "transient_prefill_bytes": "Int64",  # the phase's peak less weights and cache bytes: what the computation held
    "transient_decode_bytes": "Int64",
    "peak_nvml_source": "string",
    "rss_file_bytes": "Int64",  # CPU: file-backed part of the resident set after the timed phases (measure.py)
    "bandwidth_bytes_s": "float64",
    "threads": "Int64",
    "hostname": "string",
    "slurm_job_id": "string",  # under Slurm: the job (SLURM_JOB_ID) and its index in the sweep's array
    "slurm_array_task_id": "string",
    "pid": "Int64",  # the process that measured
    "isolation": "string",  # process (a child per job) | launcher (submitit's own process per job) | none
    "launcher": "string",  # Hydra launcher: basic | joblib | submitit_local | submitit_slurm
    "spawn_overhead_s": "float64",  # isolation=process: starting the child and its imports (wall - total_s)
    "nvml_index": "Int64",  # CUDA: the GPU as NVML (nvidia-smi) numbers it
    "compile": "boolean",  # decode step compiled (model/compiled_decode.py)
    "decode_attention": "string",  # compiled decode step's form: sdpa | sdpa_gqa | triton | grouped
    "decode_kernel": "string",  # what it runs: grouped, triton:<launch options>, or sdpa:<backend> PyTorch chose
    "cuda_graphs": "string",  # compiled decode on CUDA: manual (one graph of ours) | trees (torch.compile's)
    "warmup_released_bytes": "Int64",  # CUDA: cached allocator memory handed back after the warm-up (measure.py)
    "compile_s": "float64",  # the warm-up's first decode steps, compilation and graph recording included
    "cudagraph_skips": "Int64",  # compile_mode=reduce-overhead: graphs inductor declined to capture (0 expected)
    "contention": "string",  # none | some | heavy: what else used the machine while timing
    "others_cpu": "float64",  # cores' worth of CPU other processes used during the timed phases
    "cpu_steal": "float64",  # cores' worth of hypervisor steal
    "load_start": "float64",
    "load_end": "float64",
    "cores": "Int64",  # cores the job could use (affinity, cgroup quota)
    "oversubscribed": "boolean",  # the job's threads plus the others' busy cores passed the cores
    "gpu_others": "Int64",  # CUDA: other processes on the job's GPU
    "gpu_others_bytes": "Int64",
    "idle_wait_s": "float64",  # idle_policy=wait: how long the job waited for a quiet machine
    "prefill_cv": "float64",  # coefficient of variation of the prefill over repeats
    "decode_cv": "float64",  # of the decode steps
    "decode_ms_p50_low": "float64",  # the p50 step's 95% confidence interval (bootstrap)
    "decode_ms_p50_high": "float64",
    "memory_limit_bytes": "Int64",  # CUDA: the caching allocator's cap (memory_limit), bench.capacity's probes
    "alloc_conf": "string",  # CUDA: the allocator options the job asked for (PYTORCH_CUDA_ALLOC_CONF syntax)
    "expandable_segments": "boolean",  # CUDA: the allocator's segments were expandable (seen in its snapshot)
    "transformers_version": "string",  # the HF systems' library
    "kvpress_version": "string",  # system=kvpress
    "quant_backend": "string",  # system=hf_quantized: the quantization library and its version
    "eval": "string",  # quality evaluations run: fidelity+tasks+ppl
    "eval_question": "string",  # (schema 1) the old pass-key evaluation: in_prefill | after_prefill
    "passkey_by_depth": "string",  # (schema 1) JSON {depth: accuracy}
    "task_acc": "float64",  # the task suite: the mean of the tasks' accuracies (bench/eval/quality.py)
    "task_protocol": "string",  # aware | agnostic | multiturn
    "task_samples": "Int64",
    "task_questions": "Int64",
    **{f"acc_{task}": "float64" for task in TASKS},  # each task's accuracy (RULER's string_match_all)
}

COLUMNS = {**SCHEMA, **EXTRA}


def config_hash(job_config: dict) -> str:
    """Stable hash of what defines a job's measurement (not where it is written, not whether it is forced)."""
    text = json.dumps(job_config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def row_path(sweep_dir: str | Path, cfg_hash: str) -> Path:
    return Path(sweep_dir) / f"{cfg_hash}.parquet"


def has_row(sweep_dir: str | Path, cfg_hash: str) -> bool:
    return row_path(sweep_dir, cfg_hash).exists()


def to_frame(rows: list[dict]) -> pd.DataFrame:
    """Rows -> DataFrame with every schema column, in schema order, typed; unknown keys kept after them."""
    import pandas as pd

    return _typed(pd.DataFrame(rows))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    import pandas as pd

    df = _upgrade(df)
    for col, dtype in COLUMNS.items():
        if col not in df:
            df[col] = pd.Series([None] * len(df), dtype=dtype)
        else:
            df[col] = df[col].astype(dtype)
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[list(COLUMNS) + extra]


def _upgrade(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of an older schema as the current one: a dropped column's value moves to the column that holds it now,
    where that is empty; rows without a system are kvbench's."""
    df = df.copy()
    for old, new in DROPPED.items():
        if old not in df:
            continue
        if new is not None:
            df[new] = df[new].fillna(df[old]) if new in df else df[old]
        df = df.drop(columns=old)
    if len(df):
        if "schema_version" not in df:
            df["schema_version"] = 1
        df["schema_version"] = df["schema_version"].fillna(1)
        df["system"] = df["system"].fillna("kvbench") if "system" in df else "kvbench"
        if "cache" in df:  # bench.compare_hf named HF's dense caches by class
            df.loc[
                df["system"].astype(str).str.startswith("hf_") & df["cache"].isin(["static", "dynamic"]), "cache"
            ] = "dense"
    return df


def write_row(sweep_dir: str | Path, row: dict) -> Path:
    """Write one job's row atomically: a temp file in the same folder, then rename over the final name.
    A job killed at any point leaves either no file or the whole file (a crash may leave a *.tmp, never read)."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    final = row_path(sweep_dir, row["config_hash"])
    fd, tmp = tempfile.mkstemp(dir=sweep_dir, prefix=f".{row['config_hash']}.", suffix=".tmp")
    os.close(fd)
    try:
        to_frame([row]).to_parquet(tmp, index=False)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide rows from the others sharing a sweep folder
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def load(path: str | Path) -> pd.DataFrame:
    """Every row under `path` (a folder tree of *.parquet files, or one file) as one DataFrame."""
    import pandas as pd

    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
    if not files:
        return to_frame([])
    frames = [pd.read_parquet(f) for f in files]
    frames = [f for f in frames if len(f)]
    if not frames:
        return to_frame([])
    return _typed(pd.concat(frames, ignore_index=True))
