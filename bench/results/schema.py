"""The row schema: one dataclass per part of a row, filled by what measures it, and the columns with their types
derived from them (`COLUMNS`). Imports neither torch nor pandas, so that reading rows needs neither the model nor
the measuring code.

A row is the job's identity and configuration, its outcome, and whatever it measured: time, memory, the roofline,
the machine's contention, the system's own columns, quality. Column names are never renamed; columns are added by
adding a field.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, fields

from bench.eval.tasks import TASKS
from bench.measure.contention import Contention

SCHEMA_VERSION = 3  # 3: columns derived from the dataclasses below; label, method, peer; schema-1 columns gone

# The column names of the design card (docs/design.md), which every row holds.
DESIGN_COLUMNS = (
    "run_id", "sweep_id", "config_hash", "started_at", "git_commit", "device_name", "device_kind", "driver_version",
    "torch_version", "cuda_version", "model", "n_params", "dtype", "cache", "cache_budget", "cache_kwargs", "ctx",
    "batch", "new_tokens", "sdpa_requested", "sdpa_used", "prefill_chunk", "repeats", "seed", "status", "error",
    "prefill_s", "decode_ms_p50", "decode_ms_p90", "decode_tok_s", "total_s", "weights_bytes", "kv_bytes_dense",
    "cache_bytes", "peak_alloc_bytes", "peak_reserved_bytes", "peak_nvml_bytes", "peak_rss_bytes", "mbu",
    "kl_vs_dense", "top1_agree", "passkey_acc", "ppl",
)  # fmt: skip


@dataclass
class Identity:
    """Which run this is, where and with what."""

    schema_version: int
    run_id: str
    sweep_id: str
    config_hash: str
    started_at: str
    git_commit: str | None
    device_name: str | None
    device_kind: str
    torch_version: str
    cuda_version: str | None
    hostname: str
    pid: int  # the process that measured
    slurm_job_id: str | None = None  # under Slurm: the job (SLURM_JOB_ID) and its index in the sweep's array
    slurm_array_task_id: str | None = None
    driver_version: str | None = None  # CUDA: the driver NVML reports
    nvml_index: int | None = None  # CUDA: the GPU as NVML (nvidia-smi) numbers it


@dataclass
class Configuration:
    """What was measured, as resolved (bench/config/spec.py), and how tables and figures name it."""

    system: str  # kvbench | hf_dynamic | hf_static | ... | kvpress (bench/systems)
    system_kwargs: str | None  # JSON: the system's own knobs
    model: str
    weights: str  # random | pretrained | a local checkpoint folder
    dtype: str
    cache: str
    cache_budget: int  # tokens per sequence the cache may keep
    cache_length: int  # slots per sequence and KV head actually allocated
    cache_kwargs: str  # JSON: the cache's knobs, its defaults filled in
    ctx: int
    batch: int
    new_tokens: int
    sdpa_requested: str
    prefill_chunk: int  # tokens per prefill call (another library's prefill is one call: ctx)
    repeats: int
    seed: int
    label: str  # how tables and figures name the row: `h2o/int8`, `hf_static`, `kvpress/knorm`
    method: str  # the policy, whichever library ran it: `h2o/int8`, `knorm`, `dense/int4`
    peer: str  # kvbench's cache with the same policy (streaming_llm -> last_recent)
    threads: int | None = None  # CPU threads the job ran
    decode: str | None = None  # what the caches did with decoded tokens: evict | append (bench/config/schema.py)


@dataclass
class Outcome:
    status: str  # ok | oom | unsupported | busy | error
    error: str | None = None
    total_s: float | None = None  # the whole job, building the system included


@dataclass
class Placement:
    """Where the job ran (bench/harness/launch.py) and what it waited for."""

    isolation: str | None = None  # process (a child per job) | launcher (submitit's own process per job) | none
    launcher: str | None = None  # Hydra launcher: basic | joblib | submitit_local | submitit_slurm
    spawn_overhead_s: float | None = None  # isolation=process: starting the child and its imports (wall - total_s)
    idle_wait_s: float | None = None  # idle_policy=wait: how long the job waited for a quiet machine
    alloc_conf: str | None = None  # CUDA: the allocator options the job asked for (PYTORCH_CUDA_ALLOC_CONF syntax)
    memory_limit_bytes: int | None = None  # CUDA: the caching allocator's cap (memory_limit), bench.capacity's probes


@dataclass
class Timing:
    """The timed phases: prefill (time to first token) over repeats, decode steps over every repeat."""

    prefill_s: float  # median over repeats
    prefill_s_min: float
    decode_ms_p50: float  # over every timed step of every repeat
    decode_ms_p90: float
    decode_ms_mean: float
    decode_tok_s: float  # batch x steps / decode seconds
    sdpa_used_prefill: str  # the attention backends that ran, "+"-joined
    sdpa_used_decode: str
    sdpa_used: str  # one name when both phases agree, else "prefill|decode"
    compile_s: float | None = None  # compiled decode: the warm-up's first steps (compilation, graph recording)
    cudagraph_skips: int | None = None  # graphs inductor declined to capture (0 expected)
    prefill_cv: float | None = None  # coefficient of variation over repeats (None: one repeat)
    decode_cv: float | None = None  # over every timed step
    decode_ms_p50_low: float | None = None  # the p50 step's 95% confidence interval (bootstrap over the steps)
    decode_ms_p50_high: float | None = None


@dataclass
class Bytes:
    """Bytes that do not depend on the run's timing: the weights, a dense cache's analytic size, what the caches
    hold."""

    n_params: int
    weights_bytes: int
    kv_bytes_dense: int  # analytic: a dense cache for ctx + new_tokens tokens
    cache_bytes: int | None = None  # what the caches hold at the end
    cache_bytes_prefill: int | None = None  # what they hold right after a prefill (an eviction's compression)


@dataclass
class Memory:
    """Peaks of the timed phases (CUDA: torch's allocator and NVML; CPU: the resident set), or of the CPU's untimed
    tracked pass (`peak_alloc_source` tensor_tracker: exact live tensor bytes)."""

    peak_alloc_bytes: int | None = None
    peak_alloc_prefill_bytes: int | None = None
    peak_alloc_decode_bytes: int | None = None
    peak_alloc_source: str | None = None  # torch.cuda | tensor_tracker
    peak_reserved_bytes: int | None = None
    peak_nvml_bytes: int | None = None
    peak_nvml_source: str | None = None
    peak_rss_bytes: int | None = None
    rss_file_bytes: int | None = None  # CPU: file-backed part of the resident set after the timed phases
    warmup_released_bytes: int | None = None  # CUDA: cached allocator memory handed back after the warm-up
    expandable_segments: bool | None = None  # CUDA: the allocator's segments were expandable (seen in its snapshot)
    transient_prefill_bytes: int | None = None  # the phase's peak less weights and cache bytes: what it computed with
    transient_decode_bytes: int | None = None


@dataclass
class Roofline:
    """CUDA: a decode step's bytes (weights read once + the K/V attended) over its p50 time and the measured
    device-to-device bandwidth."""

    bandwidth_bytes_s: float | None = None
    mbu: float | None = None


@dataclass
class SystemColumns:
    """What the system says ran."""

    compile: bool | None = None  # decode step compiled
    decode_attention: str | None = None  # compiled decode step's form: sdpa | sdpa_gqa | triton | grouped
    decode_kernel: str | None = None  # what it runs: grouped, triton:<launch options>, or sdpa:<backend>
    cuda_graphs: str | None = None  # compiled decode on CUDA: manual (one graph of ours) | trees (torch.compile's)
    transformers_version: str | None = None  # the HF systems' library
    kvpress_version: str | None = None  # system=kvpress
    quant_backend: str | None = None  # system=hf_quantized: the quantization library and its version


@dataclass
class QualityColumns:
    """The quality evaluations (bench/eval/quality.py); each task's accuracy is a column `acc_<task>` beside them."""

    eval: str | None = None  # the evaluations run: fidelity+tasks+ppl
    kl_vs_dense: float | None = None
    top1_agree: float | None = None
    ppl: float | None = None
    passkey_acc: float | None = None  # the pass key's accuracy (acc_passkey)
    task_acc: float | None = None  # the mean of the tasks' accuracies
    task_protocol: str | None = None  # aware | agnostic | multiturn
    task_samples: int | None = None  # samples per task
    task_questions: int | None = None  # questions per sample
    task_prefill: str | None = None  # shared (one recording loaded into every cache) | resumed | own, or joined by +


PARTS = (Identity, Configuration, Outcome, Placement, Timing, Bytes, Memory, Roofline, Contention, SystemColumns)
PARTS += (QualityColumns,)
_DTYPES = {int: "Int64", float: "float64", str: "string", bool: "boolean"}


def _dtype(hint) -> str:
    """The pandas dtype of a field's type (X | None: X's, nullable)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return _DTYPES[args[0] if args else hint]


def _columns() -> dict[str, str]:
    columns: dict[str, str] = {}
    for part in PARTS:
        hints = typing.get_type_hints(part)
        for f in fields(part):
            if f.name in columns:
                raise TypeError(f"column {f.name!r} is declared twice ({part.__name__})")
            columns[f.name] = _dtype(hints[f.name])
    columns.update({f"acc_{task}": "float64" for task in TASKS})  # each task's accuracy (RULER's string_match_all)
    return columns


COLUMNS: dict[str, str] = _columns()
