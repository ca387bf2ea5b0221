"""The longest context (or the largest batch) each cache fits in a memory budget, found by measuring.

    python -m bench.capacity cache=dense,last_recent,h2o,snapkv memory=8GiB,16GiB model=llama-3.2-1b batch=1,4
    python -m bench.capacity cache=dense,h2o memory=16GiB find=batch ctx=32k model=llama-3.2-1b
    python -m bench.capacity cache=dense,last_recent,h2o,snapkv memory=24MiB,32MiB,48MiB,64MiB   # CPU, tiny model

Every other argument is a `bench.run` override (sweeps allowed: one search per combination). Each probe is a real
job in a process of its own (repeats=1, new_tokens=4 unless given), its row written to `results/<sweep>/` like any
other (sweep=capacity by default), so a search interrupted resumes and probes are shared between searches. A probe
fits when:

* CUDA: the job ran with the caching allocator capped to the budget (`memory_limit`) and did not run out of memory;
* CPU: its exact tracked peak of live tensor bytes (weights, caches, inputs and transients) is within the budget.

The search doubles the context from `start` (1k; batch: 1) until a probe does not fit or `max` is passed (default:
the model's longest context), then bisects to `resolution` (1/64 of the boundary, at least 256 tokens; batch: 1).
It prints a table, and writes it (`capacity.md`) with the figure of the longest context against the memory budget
(`capacity.png`) into the sweep folder.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from bench.config.spec import ConfigError, parse_bytes, parse_ctx

KNOBS = ("memory", "find", "start", "max", "resolution")


@dataclass
class Search:
    """One search: a job's overrides, a budget, what varies."""

    job: list[str]  # bench.run overrides of one job, without the searched axis
    memory: int  # bytes
    find: str  # ctx | batch
    label: str  # cache (or system) and batch, for the table and the figure


def split_args(argv: list[str]) -> tuple[dict, list[str]]:
    """(this tool's knobs, the bench.run overrides)."""
    knobs, overrides = {}, []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in KNOBS and value:
            knobs[key] = value
        elif arg not in ("-m", "--multirun"):
            overrides.append(arg)
    return knobs, overrides


def fits(row: dict, memory: int) -> bool:
    if row is None or row.get("status") != "ok":
        return False  # out of memory under the CUDA cap, or a failure: it does not fit either way
    return row.get("device_kind") == "cuda" or int(row["peak_alloc_bytes"]) <= memory


class Prober:
    """Runs (or finds already written) the probe jobs of a search."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def row(self, overrides: list[str]) -> dict | None:
        from bench.harness import launch
        from bench.results import rows as results
        from bench.results import tables

        spec, sweep_dir = _resolve(overrides)
        cfg_hash = results.config_hash(spec.identity())
        if results.has_row(sweep_dir, cfg_hash):
            return results.load(results.row_path(sweep_dir, cfg_hash)).iloc[0].to_dict()
        row = launch.execute(spec, sweep_id=sweep_dir.name, config_hash=cfg_hash, progress=False)
        if row is not None:
            results.write_row(sweep_dir, row)
            print(tables.summary_line(row), flush=True)
        return row

    def probe(self, search: Search, value: int) -> bool:
        overrides = [*search.job, f"{search.find}={value}"]
        if self.cuda:
            overrides.append(f"memory_limit={search.memory}")
        return fits(self.row(overrides), search.memory)


def longest(prober: Prober, search: Search, start: int, maximum: int, resolution) -> int:
    """The largest value that fits (0: not even `start`), doubling then bisecting."""
    if not prober.probe(search, start):
        return 0
    good, bad = start, None
    while bad is None:
        nxt = min(2 * good, maximum)
        if nxt == good:
            return good  # fits at the maximum: the search stops there
        if prober.probe(search, nxt):
            good = nxt
        else:
            bad = nxt
    while bad - good > resolution(good):
        mid = (good + bad) // 2
        if search.find == "ctx":
            mid -= mid % 256  # whole multiples of 256 tokens: probes are shared between searches
        if mid <= good:
            break
        if prober.probe(search, mid):
            good = mid
        else:
            bad = mid
    return good


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(argv)
    except ConfigError as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        return 2


def run(argv: list[str]) -> int:
    import torch

    from bench.run import job_overrides, validate, with_cache_knobs

    knobs, overrides = split_args(with_cache_knobs(argv))
    if "memory" not in knobs:
        raise ConfigError("memory=... is needed: one or more budgets, e.g. memory=8GiB,16GiB")
    memories = sorted(parse_bytes(m) for m in knobs["memory"].split(","))
    find = knobs.get("find", "ctx")
    if find not in ("ctx", "batch"):
        raise ConfigError(f"find={find!r} is not valid; valid choices: ctx, batch")
    if any(o.startswith(f"{find}=") for o in overrides):
        raise ConfigError(f"{find} is what the search varies: leave it out (start=, max= bound it)")
    defaults = {"sweep": "capacity", "repeats": "1", "new_tokens": "4", "warmup": "false"}
    overrides = [f"{k}={v}" for k, v in defaults.items() if not any(o.startswith(f"{k}=") for o in overrides)] + [
        *overrides
    ]
    validate([*overrides, "-m"])  # every value checked before any probe runs
    parse = parse_ctx if find == "ctx" else int
    start = parse(knobs.get("start", "1k" if find == "ctx" else "1"))
    cuda = torch.cuda.is_available() and not any(o == "device=cpu" for o in overrides)
    prober = Prober(cuda)
    searches = []
    for job in job_overrides(overrides, multirun=True):
        spec, sweep_dir = _resolve(job + [f"{find}={start}"])
        maximum = parse(knobs["max"]) if "max" in knobs else _default_max(spec, find)
        label = f"{_label(spec)} batch={spec.batch}" if find == "ctx" else f"{_label(spec)} ctx={spec.ctx}"
        for memory in memories:
            searches.append((Search(job, memory, find, label), maximum))
    if "resolution" in knobs:
        fixed = parse(knobs["resolution"])
        resolution = lambda value: fixed  # noqa: E731
    else:
        resolution = (lambda value: max(256, value // 64)) if find == "ctx" else (lambda value: 1)
    found = []
    for search, maximum in searches:
        value = longest(prober, search, start, maximum, resolution)
        found.append({"label": search.label, "memory": search.memory, find: value, "at_max": value == maximum})
        print(
            f"[capacity] {search.label} memory={_human(search.memory)}: {find} {value}"
            + (" (the search's maximum)" if value == maximum else ""),
            flush=True,
        )
    return report(found, find, sweep_dir)


def report(found: list[dict], find: str, sweep_dir: Path) -> int:
    from bench.results.figures import capacity_figure

    lines = [f"| cache | memory budget | longest {find} fitting |", "|---|---|---|"]
    for f in found:
        value = f"{f[find]}" + (" (search maximum)" if f["at_max"] else "")
        lines.append(f"| {f['label']} | {_human(f['memory'])} | {value} |")
    table = "\n".join(lines)
    print(f"\n{table}", flush=True)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "capacity.md").write_text(table + "\n")
    fig = capacity_figure(found, find)
    fig.savefig(sweep_dir / "capacity.png", dpi=110)
    print(f"{sweep_dir / 'capacity.md'}\n{sweep_dir / 'capacity.png'}")
    return 0


def _resolve(overrides: list[str]):
    """(the JobSpec, its sweep folder)."""
    from hydra import compose, initialize_config_dir

    from bench.config.spec import resolve
    from bench.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return resolve(cfg), Path(cfg.results_dir) / cfg.sweep


def _default_max(spec, find: str) -> int:
    from model.config import CONFIGS

    return min(CONFIGS[spec.model].block_size, 1 << 20) if find == "ctx" else 1024


def _label(spec) -> str:
    buffer = spec.cache_kwargs.get("buffer", "float")
    name = spec.cache if buffer == "float" else f"{spec.cache}/{buffer}"
    return name if spec.system == "kvbench" else spec.system


def _human(n: int) -> str:
    from bench.results.tables import human_bytes

    return human_bytes(n)


if __name__ == "__main__":
    raise SystemExit(main())
