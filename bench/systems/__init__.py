"""What a job measures: kvbench's own core, or another library's KV caches, each a class of its own in a module of
this package (the interface: bench/systems/base.py), driven by the one timed loop of bench/harness/job.py and the one
protocol runner of bench/eval/protocols.py, so that every system gets the same warm-up, timers, memory trackers, row
schema, task suite and process of its own (`system=kvbench,hf_static_compiled ... -m`).

Every module here is imported to find the systems (a module's top level imports nothing heavy: another library is
imported when its system is built), so adding a system is one module: its class names itself (`name = ...`).
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from functools import cache

import torch

from bench.systems.base import System


@cache
def system_classes() -> dict[str, type[System]]:
    """name -> class of every system, sorted by name."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found: dict[str, type[System]] = {}
    todo = list(System.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if "name" in vars(cls):
            found[cls.name] = cls
    return dict(sorted(found.items()))


def system_class(name: str) -> type[System]:
    return system_classes()[name]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def missing_extra(name: str) -> str | None:
    """Why system `name` cannot run here (an optional package is not installed), in one line; None when it can."""
    for module, extra in system_class(name).extras:
        if not _installed(module):
            return f"system={name} needs {module}: pip install -e '.[{extra}]'"
    return None


def create(spec, device: torch.device) -> System:
    """The system `spec.system.name` names, built for the job (raises UnsupportedBackend for a combination it cannot
    run, which the job writes as an `unsupported` row)."""
    from model.attention import UnsupportedBackend

    cls = system_class(spec.system.name)
    why = cls.refuse(spec, device)
    if why:
        raise UnsupportedBackend(why)
    return cls(spec, device)
