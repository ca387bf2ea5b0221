"""The harness's configuration: the structured schema Hydra composes into, and its resolution into a `JobSpec`
(every value checked, `auto`s decided, `8k` turned into 8192). A bad value raises `ConfigError` with one line
that names the valid choices."""

from __future__ import annotations

import inspect
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from caches import KVCacheParams, cache_class, cache_names
from model.attention import BACKENDS
from model.config import CONFIGS
from model.load import PRETRAINED

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
WEIGHTS = ("random", "pretrained")
DEVICES = ("auto", "cpu", "cuda")
INJECT = ("none", "oom", "error")


class ConfigError(ValueError):
    """A configuration value the harness refuses (reported as one line, exit code 2)."""


@dataclass
class BenchConfig:
    """Schema of conf/config.yaml. `cache` is the cache group: `name`, `budget` and the cache's own knobs."""

    model: str = "auto"  # auto: tiny on CPU, llama-3.2-1b on CUDA
    weights: str = "random"  # random | pretrained (smollm2-135m)
    ctx: str = "8k"  # prompt tokens per sequence: 8192, 8k, 32k, 128k
    batch: int = 1
    cache: dict[str, Any] = field(default_factory=lambda: {"name": "dense", "budget": None})
    sdpa: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    new_tokens: int = 32
    prefill_chunk: int = 2048
    repeats: int = 2
    warmup: bool = True
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # CPU threads (None: torch's default)
    sweep: str = "default"  # results go to <results_dir>/<sweep>/
    results_dir: str = "results"
    force: bool = False  # rerun a job whose config hash already has a row in the sweep folder
    track_tensors: bool = True  # CPU: one extra untimed pass under the exact tensor-bytes tracker
    nvml_period_ms: float = 5.0  # 0: no NVML sampler (to measure what it costs)
    inject: str = "none"  # none | oom | error: make the job fail on purpose (tests of failure handling)


@dataclass
class JobSpec:
    model: str
    weights: str
    ctx: int
    batch: int
    cache: str
    cache_kwargs: dict
    cache_budget: int  # tokens per sequence the cache may keep (dense: ctx + new_tokens)
    cache_length: int  # slots actually allocated per sequence and KV head
    sdpa: str
    dtype: str
    device: str
    new_tokens: int
    prefill_chunk: int
    repeats: int
    seed: int
    warmup: bool
    threads: int | None
    track_tensors: bool
    nvml_period_ms: float
    inject: str

    def identity(self) -> dict:
        """What defines the measurement: hashed for resume (where results go and `force` are not part of it)."""
        return asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def parse_ctx(value: Any) -> int:
    text = str(value).strip().lower()
    m = re.fullmatch(r"(\d+)(k?)", text)
    if not m or int(m.group(1)) == 0:
        raise ConfigError(f"ctx={value!r} is not a context length; valid: a positive integer or a number of k "
                          "tokens (1k = 1024), e.g. 8192, 8k, 32k, 128k")  # fmt: skip
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def _choice(key: str, value: Any, valid: list | tuple) -> str:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; valid choices: {', '.join(map(str, valid))}")
    return value


def _positive(key: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key}={value!r} is not valid; it must be an integer >= 1")
    return value


def resolve_budget(budget: Any, ctx: int) -> int:
    """budget <= 1: a fraction of ctx; > 1: a number of tokens. Must lie in (0, ctx]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ConfigError(f"cache.budget={budget!r} is not valid; use a fraction of ctx in (0, 1] (e.g. 0.25) "
                          "or a number of tokens <= ctx (e.g. 2048)")  # fmt: skip
    tokens = int(round(budget * ctx)) if budget <= 1 else int(budget)
    if budget > 1 and budget != int(budget):
        raise ConfigError(f"cache.budget={budget!r} is not valid; a token budget must be a whole number")
    if tokens > ctx:
        raise ConfigError(f"cache.budget={budget!r} ({tokens} tokens) is larger than ctx={ctx}; valid: a fraction "
                          f"in (0, 1] or at most {ctx} tokens")  # fmt: skip
    return max(1, tokens)


def _knobs(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "params")]


def resolve(cfg: Any, cuda_available: bool | None = None) -> JobSpec:
    """Check every value of a composed config and decide the `auto`s. Raises ConfigError (one line)."""
    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    device = _choice("device", get("device"), DEVICES)
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    elif device == "cuda" and not cuda_available:
        raise ConfigError("device='cuda' but no CUDA device is available; valid choices here: auto, cpu")
    model = get("model")
    model = ("llama-3.2-1b" if device == "cuda" else "tiny") if model == "auto" else model
    _choice("model", model, ["auto", *CONFIGS])
    weights = _choice("weights", get("weights"), WEIGHTS)
    if weights == "pretrained" and model not in PRETRAINED:
        raise ConfigError(f"weights='pretrained' is not available for model={model!r}; models with real weights "
                          f"offline: {', '.join(PRETRAINED)}")  # fmt: skip
    ctx = parse_ctx(get("ctx"))
    batch = _positive("batch", get("batch"))
    new_tokens = _positive("new_tokens", get("new_tokens"))
    prefill_chunk = _positive("prefill_chunk", get("prefill_chunk"))
    repeats = _positive("repeats", get("repeats"))
    sdpa = _choice("sdpa", get("sdpa"), BACKENDS)
    dtype = get("dtype")
    dtype = ("bfloat16" if device == "cuda" else "float32") if dtype == "auto" else dtype
    _choice("dtype", dtype, ["auto", *DTYPES])
    dtype = str(DTYPES[dtype]).removeprefix("torch.")
    cache_cfg = dict(get("cache") or {})
    name = cache_cfg.pop("name", None)
    _choice("cache", name, cache_names())
    budget = cache_cfg.pop("budget", None)
    cls = cache_class(name)
    knobs = _knobs(cls)
    every_knob = {k for n in cache_names() for k in _knobs(cache_class(n))}
    unknown = sorted(set(cache_cfg) - every_knob)
    if unknown:
        raise ConfigError(f"cache.{unknown[0]} is not a knob of cache {name!r}; valid knobs: "
                          f"{', '.join(['budget', *knobs])}")  # fmt: skip
    # Knobs of other caches are ignored here, so that one sweep can set them for the caches that have them.
    cache_cfg = {k: v for k, v in cache_cfg.items() if k in knobs}
    if name == "dense":
        cache_budget = cache_length = ctx + new_tokens  # every token; a budget does not apply
    else:
        if budget is None:
            raise ConfigError(f"cache {name!r} needs cache.budget: a fraction of ctx in (0, 1] or a token count")
        cache_budget = resolve_budget(budget, ctx)
        cache_length = cache_budget + int(cache_cfg.get("sink_tokens", 0) or 0)  # sinks come on top of the window
    try:  # the cache checks its own knobs: build one on the meta device (allocates nothing)
        probe = KVCacheParams(1, 1, 1, CONFIGS[model].head_size, cache_length, torch.device("meta"), torch.float32)
        cls(probe, **cache_cfg)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"cache {name!r}: {err}") from None
    threads = get("threads")
    if threads is not None:
        _positive("threads", threads)
    inject = _choice("inject", get("inject"), INJECT)
    return JobSpec(
        model=model, weights=weights, ctx=ctx, batch=batch, cache=name, cache_kwargs=cache_cfg,
        cache_budget=cache_budget, cache_length=cache_length, sdpa=sdpa, dtype=dtype, device=device,
        new_tokens=new_tokens, prefill_chunk=prefill_chunk, repeats=repeats, seed=int(get("seed")),
        warmup=bool(get("warmup")), threads=threads, track_tensors=bool(get("track_tensors")),
        nvml_period_ms=float(get("nvml_period_ms")), inject=inject,
    )  # fmt: skip
