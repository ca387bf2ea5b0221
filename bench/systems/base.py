"""The interface every system implements, and what a system declares about itself.

A system is one class in a module of its own under bench/systems/: its name (`system=<name>`), its own settings (a
dataclass, `Knobs`, set as `system.<knob>=...`), what it can run (protocols, evaluations, devices, attention
backends, a budget of its own), how a row of it is labelled in tables and figures, and the calls a job makes:

* `prefill(ids)` and `decode(token, pos)`: the timed path, each returning the next greedy token per sequence (B, 1);
* `open(batch, tokens)`, `forward(ids, start)` and `question(tokens)`: the task suite's path (bench/eval/protocols.py),
  fresh caches, any number of tokens through them, and a question whose tokens are dropped again afterwards;
* `cache_bytes()`, `resident_bytes()`, `columns()`: what its caches hold, what it keeps between calls, what ran.

The harness, the spec, the report and the plots ask the class (bench/systems/__init__.py finds every class); no
code outside a system's own module tests its name.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from bench.config.spec import JobSpec
    from model.config import Config


@dataclass
class NoKnobs:
    """A system without settings of its own."""


class ConfigProblem(ValueError):
    """A system's settings it refuses (bench.config turns it into one line, exit code 2)."""


class System:
    """Subclasses set `name` and what they support, build `model` (a torch module holding the weights), `config` (its
    shape), `tokenizer` (or None) and `kv_slots` (token slots per sequence that `cache_bytes` counts), and implement
    the calls."""

    name: ClassVar[str]  # the `system=` choice; a class without one (a shared base) is not a choice
    Knobs: ClassVar[type] = NoKnobs  # the system's own settings, with their defaults
    extras: ClassVar[tuple[tuple[str, str], ...]] = ()  # (module it imports, the extra of pyproject.toml installing it)
    # A system that evicts by a policy of its own to cache.budget tokens (its cache group stays dense) says how it is
    # chosen ("press=<name>", "a window"); None: it keeps what its cache keeps.
    own_policy: ClassVar[str | None] = None
    # What its caches do with decoded tokens (cache.decode, bench/config/schema.py DECODE_MODES), its default first:
    # a cache that is compressed once, or never, and grows by each decoded token `append`s.
    decode_modes: ClassVar[tuple[str, ...]] = ("append",)
    protocols: ClassVar[tuple[str, ...]] = ("aware", "agnostic", "multiturn")  # of the task suite
    evals: ClassVar[tuple[str, ...]] = ("tasks",)  # quality evaluations it can run
    devices: ClassVar[tuple[str, ...]] = ("cpu", "cuda")
    any_backend: ClassVar[bool] = False  # sdpa=<backend> chooses its attention kernel (else: sdpa=auto only)
    kvbench_caches: ClassVar[bool] = False  # runs any of caches/'s caches (else: cache=dense, its own caches)
    allocates_up_front: ClassVar[bool] = True  # its caches exist before a prompt goes through them
    # one model answers many configurations (`use_cache`), a prompt recorded once loading each (`shares_prompt`)
    shares_prompts: ClassVar[bool] = False

    model: torch.nn.Module
    config: Config
    tokenizer = None
    kv_slots: int
    prefill_chunk: int  # tokens per prefill call (another library's prefill is one call over the prompt)

    # ---- settings, checked before anything runs (bench/config/spec.py) ----------------------------------------------

    @classmethod
    def check_knobs(cls, knobs: dict) -> dict:
        """The system's knobs as the job will use them (raises ConfigProblem: one line)."""
        return knobs

    @classmethod
    def compiled(cls, compile: str, device: str, cache_cls: type, sdpa: str) -> bool:
        """Whether the decode step runs compiled, given compile=auto|true|false."""
        return False

    @classmethod
    def cache_name(cls, cache: str, knobs: dict) -> str:
        """What the row's `cache` column says this system's cache is."""
        return cache

    # ---- labels of a row (computed when the row is made, so that reading rows needs no system code) --------------

    @classmethod
    def label(cls, cache: str, cache_kwargs: dict, knobs: dict) -> str:
        """How tables and figures name the row: kvbench's cache (`h2o/int8`), or another library's system."""
        return cls.name

    @classmethod
    def method(cls, cache: str, cache_kwargs: dict, knobs: dict) -> str:
        """The policy the row ran, whichever library ran it (`h2o/int8`, `knorm`, `dense/int4`)."""
        return cache

    @classmethod
    def peer(cls, cache: str, cache_kwargs: dict, knobs: dict) -> str:
        """kvbench's cache with the same policy (its own for kvbench's rows)."""
        return cls.method(cache, cache_kwargs, knobs)

    # ---- the timed path ----------------------------------------------------------------------------------------

    def prefill(self, ids: Tensor, desc: str | None = None) -> Tensor:
        """A new prompt (B, T) through the caches; returns the next token (B, 1). desc: a progress bar's label."""
        raise NotImplementedError

    def decode(self, token: Tensor, pos: int) -> Tensor:
        """One token per sequence (B, 1) at position `pos`; returns the next token (B, 1)."""
        raise NotImplementedError

    # ---- the task suite's path ---------------------------------------------------------------------------------

    def open(self, batch: int, tokens: int) -> None:
        """Fresh caches of the job's kind for `batch` sequences of up to `tokens` tokens."""
        raise NotImplementedError

    def forward(self, ids: Tensor, start: int) -> Tensor:
        """ids (B, T) through the caches at positions start.. (0: a new prompt, compressed as this system compresses
        a prompt); returns the last position's logits (B, vocab)."""
        raise NotImplementedError

    @classmethod
    def shares_config(cls, knobs: dict) -> bool:
        """Whether a configuration of this system (its knobs) answers from a pass it shares with others (a model
        serving many configurations, a prompt recorded once): `shares_prompts`, unless its knobs say otherwise."""
        return cls.shares_prompts

    def use_cache(self, cache, knobs: dict | None = None) -> None:
        """Another configuration's caches (a CacheSpec, and the system's knobs where they choose the policy) from the
        next `open` on; for systems that `shares_prompts`."""
        raise NotImplementedError

    def shares_prompt(self, length: int) -> bool:
        """Whether a prompt of `length` tokens can be recorded once (`record`) and loaded into this system's caches
        (`load`) instead of prefilled by each: one prefill serving every cache of a sweep (bench/eval/quality.py)."""
        return False

    def record(self, ids: Tensor) -> tuple[Tensor, list]:
        """ids (B, T) through the model once: (the last position's logits (B, vocab), what `load` needs)."""
        raise NotImplementedError

    def load(self, prompts: list) -> None:
        """The caches `open` made, loaded with a recorded prompt as their own `forward(ids, 0)` would leave them."""
        raise NotImplementedError

    def chunks_as_one(self) -> bool:
        """Whether the caches `open` made leave the same state for a prompt in two calls (context, then question) as
        in one: then a copy of them after a context (`snapshot`) serves every prompt that begins with it."""
        return False

    def causal_prefix(self) -> int:
        """How many first positions of a prompt the caches `open` made attend as plain causal attention in their own
        prefill, whatever follows: a recorded prompt's first positions, loaded (`load`), stand for them (0: none)."""
        return 0

    def snapshot(self) -> object:
        """A copy of the caches' state (for caches that `chunks_as_one`)."""
        raise NotImplementedError

    def restore(self, state: object) -> bool:
        """The caches as `snapshot` saw them (copied again: a state can be restored many times); False where `state`
        is another configuration's, or smaller than the caches `open` made."""
        raise NotImplementedError

    def release_decoded(self) -> None:
        """Free what decoding added beside the prompt's caches (`cache.decode=append`: the appended tokens), so that
        a measurement that follows starts from the prompt's caches alone."""

    def question(self, tokens: int) -> AbstractContextManager:
        """Around a question (and its answer, `tokens` in all) asked of the context in the caches: on exit the caches
        are back to the context alone (the `agnostic` protocol)."""
        raise NotImplementedError

    # ---- memory and what ran -----------------------------------------------------------------------------------

    def cache_bytes(self) -> int:
        """Bytes the caches hold now."""
        raise NotImplementedError

    def resident_bytes(self) -> int:
        """Bytes of the tensors the system keeps between calls (weights, buffers, caches allocated up front): the
        CPU tensor tracker's baseline."""
        raise NotImplementedError

    def columns(self) -> dict:
        """What ran, as row columns (compiled or not, which kernel, which library version)."""
        return {}

    def read_bytes_per_token(self) -> int:
        """Weight bytes a decode step reads once (an untied embedding table is looked up, not read)."""
        embedding = getattr(self, "embedding_bytes", 0)
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) - embedding

    def eager_steps(self) -> AbstractContextManager:
        """Inside: decode steps run eagerly, the same fixed-shape step where it was compiled (the CPU tensor tracker
        counts ops as they run; compiled code would hide its intermediates from it)."""
        return nullcontext()

    @classmethod
    def refuse(cls, spec: JobSpec, device: torch.device) -> str | None:
        """Why this system cannot run `spec` here (an `unsupported` row), or None."""
        if not cls.kvbench_caches and not cls.own_policy and spec.cache.name != "dense":
            return (
                f"system {cls.name} is another library's cache, which keeps every token: cache=dense only "
                f"(cache={spec.cache.name} runs with system=kvbench)"
            )
        if not cls.any_backend and spec.sdpa != "auto":
            return (
                f"system {cls.name} runs its library's attention, which picks its kernel itself: sdpa=auto only "
                f"(got sdpa={spec.sdpa})"
            )
        if device.type not in cls.devices:
            return f"system {cls.name} runs with device={' or device='.join(cls.devices)} only (got {device.type})"
        other = [e for e in spec.eval.evals if e not in cls.evals]
        if other:
            return (
                f"eval {'+'.join(other)} runs on kvbench's caches (system=kvbench); system {cls.name} runs "
                f"eval={'+'.join(cls.evals)}"
            )
        protocol = spec.eval.protocol
        if "tasks" in spec.eval.evals and protocol not in cls.protocols:
            return f"system {cls.name} answers the task suite under eval.protocol={' or '.join(cls.protocols)} only"
        if "tasks" in spec.eval.evals and protocol == "multiturn" and spec.cache.decode != cls.decode_modes[0]:
            return (
                f"eval.protocol=multiturn keeps evicting through the conversation: cache.decode={cls.decode_modes[0]} "
                f"only (got cache.decode={spec.cache.decode})"
            )
        return None


@contextmanager
def swapped(obj, attr: str, value):
    """obj.attr set to `value` inside the block."""
    saved = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield
    finally:
        setattr(obj, attr, saved)
