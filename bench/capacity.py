"""The longest context (or the largest batch) each cache fits in a memory budget, found by measuring.

    python -m bench.capacity cache=dense,last_recent,h2o,snapkv memory=8GiB,16GiB model=llama-3.2-1b batch=1,4
    python -m bench.capacity cache=dense,h2o memory=16GiB find=batch ctx=32k model=llama-3.2-1b
    python -m bench.capacity cache=dense,last_recent,h2o,snapkv memory=24MiB,32MiB,48MiB,64MiB   # CPU, tiny model

Its settings are `bench.run`'s (sweeps allowed: one search per combination, each memory budget included) and the
search's own: `memory`, `find` (ctx | batch), `start`, `max`, `resolution` (bench/config/schema.py, CapacityConfig;
defaults in conf/capacity.yaml), checked as `bench.run` checks a command. Each probe is a real job in a process of its
own (repeats=1, new_tokens=4 unless given), its row written to `results/<sweep>/` like any other (sweep=capacity by
default), so a search interrupted resumes and probes are shared between searches. A probe fits when:

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
from bench.harness.sweep import compose_job, expand

CONFIG = "capacity"  # conf/capacity.yaml


@dataclass
class Search:
    """One search: a job's overrides, a budget, what varies."""

    job: list[str]  # bench.run overrides of one job, without the searched axis
    memory: int  # bytes
    find: str  # ctx | batch
    label: str  # cache (or system) and batch, for the table and the figure


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

        spec, sweep_dir, _ = compose_job(overrides, CONFIG)
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
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        return run([a for a in argv if a not in ("-m", "--multirun")])
    except ConfigError as err:
        print(f"kvbench: error: {err}", file=sys.stderr)
        return 2


def run(overrides: list[str]) -> int:
    import torch

    jobs = expand(overrides, multirun=True, config_name=CONFIG)
    searches, sweep_dir = [], None
    for job in jobs:  # every value checked before any probe runs
        spec, sweep_dir, cfg = compose_job(job, CONFIG)
        if cfg.memory is None:
            raise ConfigError("memory=... is needed: one or more budgets, e.g. memory=8GiB,16GiB")
        find = cfg.find
        if any(o.startswith(f"{find}=") for o in job):
            raise ConfigError(f"{find} is what the search varies: leave it out (start=, max= bound it)")
        parse = parse_ctx if find == "ctx" else _positive_int
        start = parse(cfg.start or ("1k" if find == "ctx" else "1"))
        maximum = parse(cfg.max) if cfg.max else _default_max(spec, find)
        if cfg.resolution:
            fixed = parse(cfg.resolution)
            resolution = lambda value, fixed=fixed: fixed  # noqa: E731
        else:
            resolution = (lambda value: max(256, value // 64)) if find == "ctx" else (lambda value: 1)
        what = f"batch={spec.batch}" if find == "ctx" else f"ctx={spec.ctx}"
        label = f"{_label(spec)} {what}"
        searches.append((Search(job, parse_bytes(cfg.memory), find, label), start, maximum, resolution))
    prober = Prober(torch.cuda.is_available() and spec.device == "cuda")
    found = []
    for search, start, maximum, resolution in searches:
        value = longest(prober, search, start, maximum, resolution)
        found.append({"label": search.label, "memory": search.memory, search.find: value, "at_max": value == maximum})
        print(
            f"[capacity] {search.label} memory={_human(search.memory)}: {search.find} {value}"
            + (" (the search's maximum)" if value == maximum else ""),
            flush=True,
        )
    return report(found, searches[0][0].find, sweep_dir)


def _positive_int(value: str) -> int:
    if not str(value).isdigit() or int(value) < 1:
        raise ConfigError(f"{value!r} is not a batch size; valid: an integer >= 1")
    return int(value)


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


def _default_max(spec, find: str) -> int:
    from model.config import Config

    return min(Config.from_name(spec.model).block_size, 1 << 20) if find == "ctx" else 1024


def _label(spec) -> str:
    from bench.harness.job import configuration

    return configuration(spec).label


def _human(n: int) -> str:
    from bench.results.tables import human_bytes

    return human_bytes(n)


if __name__ == "__main__":
    raise SystemExit(main())
