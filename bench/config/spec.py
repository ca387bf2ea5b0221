"""A job's settings resolved: every value checked (the only place that checks them), the `auto`s decided, `8k`
turned into 8192, the cache's and the system's knobs filled in. A bad value raises `ConfigError` with one line that
names the valid choices. A value is checked even where the chosen cache, system or evaluation would not use it."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from bench.config.schema import CacheConfig, EvalConfig, RunConfig, cache_knobs
from caches import KVCacheParams, cache_class, cache_names
from model.config import Config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ConfigError(ValueError):
    """A configuration value the harness refuses (reported as one line, exit code 2)."""


@dataclass(frozen=True)
class CacheSpec:
    name: str  # the row's `cache`: kvbench's cache, or the policy of a system that evicts by its own (a press)
    kwargs: dict  # the cache's knobs, its defaults filled in
    budget: int  # tokens per sequence the cache may keep (dense: ctx + new_tokens)
    length: int  # slots allocated per sequence and KV head
    allocation: str | None = None  # how the layers share the budget (caches/allocation.py); None: the cache's own
    decode: str = "evict"  # after the prompt: evict to the budget, or append (bench/config/schema.py DECODE_MODES)


@dataclass(frozen=True)
class SystemSpec:
    name: str  # bench/systems: kvbench's own core, or another library's caches
    knobs: dict  # the system's own settings (hf_quantized's nbits, kvpress's press)


@dataclass(frozen=True)
class JobSpec:
    """What a job runs: its checked settings (`settings`, a RunConfig whose `auto`s are decided; `spec.batch` reads
    `spec.settings.batch`) and what resolving them decided."""

    settings: RunConfig
    ctx: int
    cache: CacheSpec
    system: SystemSpec
    eval: EvalConfig
    compile: bool  # decode through model/compiled_decode.py
    expandable_segments: bool  # CUDA allocator with expandable segments (always False on CPU)
    memory_limit: int | None  # CUDA: bytes the caching allocator may hold (None: the whole device)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "settings":  # pickling looks for dunders before the fields exist
            raise AttributeError(name)
        return getattr(self.settings, name)

    def identity(self) -> dict:
        """What defines the measurement, hashed for resume: the settings that change it (where results go, whether
        a job is forced or waits for a quiet machine do not) and what resolving them decided."""
        settings = {
            f.name: getattr(self.settings, f.name) for f in fields(RunConfig) if f.metadata.get("identity", True)
        }
        evals = asdict(self.eval) if self.eval.evals else {}
        cache = asdict(self.cache)
        if cache["decode"] == _system_class(self.system.name).decode_modes[0]:
            del cache["decode"]  # the system's own mode hashes as a row that never chose one: such rows still resume
        resolved = {
            "ctx": self.ctx,
            "cache": cache,
            "system": asdict(self.system),
            "eval": evals,
            "compile": self.compile,
            "expandable_segments": self.expandable_segments,
            "memory_limit": self.memory_limit,
        }
        return {**settings, **resolved}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def parse_ctx(value: Any) -> int:
    text = str(value).strip().lower()
    m = re.fullmatch(r"(\d+)(k?)", text)
    if not m or int(m.group(1)) == 0:
        raise ConfigError(
            f"ctx={value!r} is not a context length; valid: a positive integer or a number of k "
            "tokens (1k = 1024), e.g. 8192, 8k, 32k, 128k"
        )
    return int(m.group(1)) * (1024 if m.group(2) else 1)


_UNITS = {"": 1, "b": 1, "k": 1024, "kib": 1024, "m": 1024**2, "mib": 1024**2, "g": 1024**3, "gib": 1024**3}
_UNITS.update(kb=1000, mb=1000**2, gb=1000**3)


def parse_bytes(value: Any) -> int:
    """`8GiB`, `512MiB`, `16g`, `2GB` (decimal), or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(
            f"{value!r} is not an amount of memory; valid: a positive number with a unit such as 8GiB, "
            "512MiB, 2GB, or a number of bytes"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def resolve_budget(budget: Any, ctx: int) -> int:
    """budget <= 1: a fraction of ctx; > 1: a whole number of tokens. Must lie in (0, ctx]."""
    if budget <= 0 or (budget > 1 and budget != int(budget)):
        raise ConfigError(
            f"cache.budget={budget!r} is not valid; use a fraction of ctx in (0, 1] (e.g. 0.25) "
            "or a whole number of tokens <= ctx (e.g. 2048)"
        )
    tokens = int(round(budget * ctx)) if budget <= 1 else int(budget)
    if tokens > ctx:
        raise ConfigError(
            f"cache.budget={budget!r} ({tokens} tokens) is larger than ctx={ctx}; valid: a fraction "
            f"in (0, 1] or at most {ctx} tokens"
        )
    return max(1, tokens)


def check_fields(node: Any, prefix: str = "") -> None:
    """The `choices` and `min` that the schema's fields declare, for a config node and the nodes inside it."""
    for f in fields(node):
        value, meta, key = getattr(node, f.name), f.metadata, prefix + f.name
        if is_dataclass(value):
            check_fields(value, key + ".")
            continue
        if value is None:
            continue
        if meta.get("choices") is not None:
            valid = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
            for item in value if isinstance(value, list) else [value]:
                if item not in valid:
                    raise ConfigError(f"{key}={item!r} is not valid; valid choices: {', '.join(map(str, valid))}")
        if meta.get("min") is not None and value < meta["min"]:
            kind = "an integer " if isinstance(value, int) else ""
            raise ConfigError(f"{key}={value!r} is not valid; it must be {kind}>= {meta['min']}")


def resolve(cfg: Any, cuda_available: bool | None = None) -> JobSpec:
    """Check every value of a composed config (a DictConfig of RunConfig, or a RunConfig) and decide the `auto`s.
    Raises ConfigError (one line)."""
    run: RunConfig = cfg if isinstance(cfg, RunConfig) else OmegaConf.to_object(cfg)
    run.compile = run.compile.lower()  # `compile=true` arrives as Hydra's boolean, spelled True
    check_fields(run)
    if not run.eval.suite:
        from bench.eval.tasks import TASKS

        raise ConfigError(f"eval.suite is empty; valid tasks: {', '.join(TASKS)}")
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    device = run.device
    if device == "auto":
        device = "cuda" if cuda_available else "cpu"
    elif device == "cuda" and not cuda_available:
        raise ConfigError("device='cuda' but no CUDA device is available; valid choices here: auto, cpu")
    model, weights, model_config = _model(run.model, run.weights, device)
    ctx = parse_ctx(run.ctx)
    if run.repeats == 0 and not run.eval.evals:
        raise ConfigError("repeats=0 is not valid; it must be an integer >= 1 (0: only with an eval, quality only)")
    dtype = ("bfloat16" if device == "cuda" else "float32") if run.dtype == "auto" else run.dtype
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    memory_limit = None
    if run.memory_limit is not None:
        if device != "cuda":
            raise ConfigError(
                "memory_limit caps the CUDA caching allocator; on the CPU the tracked peak says what a "
                "job needs (python -m bench.capacity compares it with a budget)"
            )
        memory_limit = parse_bytes(run.memory_limit)
    if run.eval.evals and weights == "random":
        raise ConfigError(
            f"eval {'+'.join(run.eval.evals)} needs real weights: add weights=pretrained model=smollm2-135m, "
            "or weights=<a local checkpoint folder>"
        )
    system = _system(run.system)
    cache = _cache(run.cache, system, ctx, run.new_tokens, model_config)
    cls = _system_class(system.name)
    compile_ = cls.compiled(run.compile, device, cache_class(run.cache.name), run.sdpa)
    if run.compile == "auto" and cache.decode != cls.decode_modes[0]:
        compile_ = False  # the compiled step decodes a system's own mode
    settings = replace(run, model=model, weights=weights, device=device, dtype=dtype)
    return JobSpec(
        settings=settings,
        ctx=ctx,
        cache=cache,
        system=system,
        eval=run.eval,
        compile=compile_,
        expandable_segments=run.expandable_segments and device == "cuda",
        memory_limit=memory_limit,
    )


def _model(model: str, weights: str, device: str) -> tuple[str, str, Config]:
    """(model name, weights, its Config): a named shape with random or real weights, or a local checkpoint folder
    (weights=<path>: config.json and *.safetensors; the model is named after the folder)."""
    from model.load import PRETRAINED

    if weights not in ("random", "pretrained"):
        path = Path(weights).expanduser()
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            raise ConfigError(
                f"weights={weights!r} is not valid; valid choices: random, pretrained, or a folder "
                "holding a checkpoint's config.json and *.safetensors"
            )
        from model.load import config_from_hf

        try:
            config = config_from_hf(json.loads((path / "config.json").read_text()), name=path.name)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"weights={weights!r}: {err}") from None
        return path.name, str(path.resolve()), config
    model = ("llama-3.2-1b" if device == "cuda" else "tiny") if model == "auto" else model
    if weights == "pretrained" and model not in PRETRAINED:
        raise ConfigError(
            f"weights='pretrained' is not available for model={model!r}; models with real weights "
            f"offline: {', '.join(PRETRAINED)} (or weights=<a local checkpoint folder>)"
        )
    return model, weights, Config.from_name(model)


def _system_class(name: str):
    from bench.systems import system_class

    return system_class(name)


def _system(node: dict) -> SystemSpec:
    """system=<name> and its knobs, checked against the system's `Knobs` (types, then the system's own rules)."""
    from bench.systems import missing_extra
    from bench.systems.base import ConfigProblem

    knobs = {k: v for k, v in node.items() if k != "name"}
    name = node["name"]
    why = missing_extra(name)
    if why:
        raise ConfigError(why)
    cls = _system_class(name)
    valid = [f.name for f in fields(cls.Knobs)]
    unknown = sorted(set(knobs) - set(valid))
    if unknown:
        raise ConfigError(
            f"system.{unknown[0]} is not a knob of system {name!r}; valid knobs: {', '.join(valid) or 'none'}"
        )
    missing = [k for k in valid if k not in knobs]
    if missing:
        raise ConfigError(f"system {name!r} needs system.{missing[0]} (its default is in bench/systems/)")
    typed = OmegaConf.structured(cls.Knobs)
    for key, value in knobs.items():
        try:
            typed[key] = value
        except Exception:  # noqa: BLE001 - OmegaConf's validation errors: the value's type is wrong
            kind = cls.Knobs.__dataclass_fields__[key].type
            raise ConfigError(f"system.{key}={value!r} is not valid; it must be of type {kind}") from None
    try:
        knobs = cls.check_knobs(OmegaConf.to_container(typed))
    except ConfigProblem as err:
        raise ConfigError(str(err)) from None
    return SystemSpec(name, knobs)


def _cache(node: CacheConfig, system: SystemSpec, ctx: int, new_tokens: int, model_config: Config) -> CacheSpec:
    """The cache group: the cache, its budget and slots, its knobs with their defaults; every knob set is checked by
    a cache that has it, whichever cache runs."""
    cls = _system_class(system.name)
    name, budget = node.name, node.budget
    if name not in cache_names():
        raise ConfigError(f"cache={name!r} is not valid; valid choices: {', '.join(cache_names())}")
    if budget is not None:
        resolve_budget(budget, ctx)
    knobs = cache_knobs()
    given = {k: getattr(node, k) for k in knobs if getattr(node, k) is not None}
    cache_cls = cache_class(name)
    own = cache_cls.knob_defaults(given)
    kwargs = {k: given.get(k, default) for k, default in own.items()}
    probe_length = resolve_budget(budget, ctx) if budget is not None else ctx
    for knob, value in given.items():  # another cache's knob: refused where the caches that have it refuse it
        if knob not in own:
            _probe(next(iter(knobs[knob][1])), {knob: value}, probe_length, model_config)
    allocation = node.allocation or cache_cls.allocation
    decode = _decode(node.decode, cls, cache_cls)
    if cls.own_policy:  # another library's eviction: the budget of the cache group, its own policy
        if not cache_cls.keeps_every_token:
            raise ConfigError(
                f"system={system.name} evicts with its own policy ({cls.own_policy}); cache={name} is kvbench's: "
                "leave cache at dense and set cache.budget"
            )
        if budget is None:
            raise ConfigError(f"system={system.name} needs cache.budget: a fraction of ctx in (0, 1] or a token count")
        tokens = resolve_budget(budget, ctx)
        return CacheSpec(cls.cache_name(name, system.knobs), {}, tokens, tokens, allocation, decode)
    if cache_cls.keeps_every_token:
        _probe(name, kwargs, ctx + new_tokens, model_config)
        return CacheSpec(name, kwargs, ctx + new_tokens, ctx + new_tokens, allocation, decode)
    if budget is None:
        raise ConfigError(f"cache {name!r} needs cache.budget: a fraction of ctx in (0, 1] or a token count")
    tokens = resolve_budget(budget, ctx)
    length = tokens + int(kwargs.get("sink_tokens") or 0)  # sinks come on top of the window
    _probe(name, kwargs, length, model_config)
    return CacheSpec(name, kwargs, tokens, length, allocation, decode)


def _decode(decode: str | None, cls, cache_cls: type) -> str:
    """cache.decode as the system runs it: its own first mode unless another is asked and it has it; a cache that keeps
    every token evicts nothing in either mode, so it runs (and hashes as) the system's own."""
    modes = cls.decode_modes
    if cache_cls.keeps_every_token and not cls.own_policy:
        return modes[0]
    if decode is not None and decode not in modes:
        valid = ", ".join(modes)
        raise ConfigError(f"cache.decode={decode!r} is not valid for system={cls.name}; valid choices: {valid}")
    return modes[0] if decode is None else decode


def _probe(name: str, kwargs: dict, length: int, model_config: Config) -> None:
    """The cache checks its own knobs: built on the meta device (allocates nothing)."""
    probe = KVCacheParams(1, 1, 1, model_config.head_size, length, torch.device("meta"), torch.float32)
    try:
        cache_class(name)(probe, **kwargs)
    except (ValueError, TypeError) as err:
        knob = next(iter(kwargs)) if len(kwargs) == 1 else None
        where = f"cache.{knob}={kwargs[knob]!r}" if knob else f"cache {name!r}"
        raise ConfigError(f"{where}: {err}") from None
