"""What a job measures: kvbench's own core, or another library's KV caches, behind one small interface that the
one timed loop of bench/harness/job.py drives, so that every system gets the same warm-up, timers, memory trackers, row
schema and process of its own (`system=kvbench,hf_static_compiled ... -m`).

A system builds its model (kvbench's GPT, or another library's model holding exactly the same weights) and its
caches, then answers four calls: `prefill(ids)` and `decode(token, pos)` each return the next greedy token per
sequence (B, 1); `cache_bytes()` is what its caches hold now; `columns()` says what ran. Another library's system
also answers the task suite through its own caches (`answers(samples, protocol)`, bench/systems/hf_protocols.py);
kvbench's is answered by bench/eval/quality.py on its model directly.
"""

from __future__ import annotations

import importlib.util
from contextlib import contextmanager

import torch
from torch import Tensor

from model.config import Config

SYSTEMS = (
    "kvbench",
    "hf_dynamic",
    "hf_static",
    "hf_static_compiled",
    "hf_quantized",
    "hf_offloaded",
    "hf_sliding",
    "kvpress",
)
# system -> the modules it needs, each with the optional extra of pyproject.toml that installs it
EXTRAS = {name: [("transformers", "hf")] for name in SYSTEMS if name != "kvbench"}
EXTRAS["hf_quantized"].append(("optimum.quanto", "hf"))
EXTRAS["kvpress"].append(("kvpress", "peers"))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def missing_extra(name: str) -> str | None:
    """Why `name` cannot run here (an optional package is not installed), in one line; None when it can."""
    for module, extra in EXTRAS.get(name, []):
        if not _installed(module):
            return f"system={name} needs {module}: pip install -e '.[{extra}]'"
    return None


class System:
    """The interface. Subclasses set `model` (a torch module holding the weights), `config` (its shape, a
    model.config.Config), `tokenizer` (or None) and `kv_slots` (token slots per sequence that `cache_bytes`
    counts), and implement the calls below."""

    name = "system"
    model: torch.nn.Module
    config: Config
    tokenizer = None
    kv_slots: int

    def prefill(self, ids: Tensor, desc: str | None = None) -> Tensor:
        """A new prompt (B, T), through the caches; returns the next token (B, 1). desc: a progress bar's label."""
        raise NotImplementedError

    def decode(self, token: Tensor, pos: int) -> Tensor:
        """One token per sequence (B, 1) at position `pos`; returns the next token (B, 1)."""
        raise NotImplementedError

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

    @contextmanager
    def eager_steps(self):
        """Inside: decode steps run eagerly, the same fixed-shape step where it was compiled (the CPU tensor
        tracker counts ops as they run; compiled code would hide its intermediates from it)."""
        yield


def create(spec, device: torch.device) -> System:
    """The system `spec.system` names, built for the job (raises UnsupportedBackend for a combination it cannot
    run, which the job writes as an `unsupported` row)."""
    if spec.system == "kvbench":
        from bench.systems.kvbench import KvbenchSystem

        return KvbenchSystem(spec, device)
    if spec.system == "kvpress":
        from bench.systems.kvpress import KvpressSystem

        return KvpressSystem(spec, device)
    from bench.systems.hf import HFSystem

    return HFSystem(spec, device)
