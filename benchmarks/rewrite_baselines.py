"""Rewrite committed result rows to the current row schema (bench/results/schema.py), in place:

    python benchmarks/rewrite_baselines.py results/baselines

Rows of schema 1 and 2 become schema 3: a column that always held another's value moves to it (`device` to
`device_kind`, `peak_tracked_bytes` to `peak_alloc_bytes`), a row without a system is kvbench's, HF's dense caches named
by their class (`static`, `dynamic`) are `dense`, the columns of removed settings and of the old pass-key evaluation
(`passkey_by_depth`, `eval_question`) go, and each row gets the `label`, `method` and `peer` its system's class gives
it. Every other value stays as it was measured. A row already of the current schema is left alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from bench.results.rows import to_frame
from bench.results.schema import COLUMNS, SCHEMA_VERSION
from bench.systems import system_class

MOVED = {"device": "device_kind", "peak_tracked_bytes": "peak_alloc_bytes"}


def upgrade(row: dict) -> dict:
    """One row of an older schema as a row of the current one."""
    for old, new in MOVED.items():
        if old in row and row.get(new) is None:
            row[new] = row[old]
    system = row.get("system") or "kvbench"
    row["system"] = system
    if system.startswith("hf_") and row.get("cache") in ("static", "dynamic"):
        row["cache"] = "dense"
    cache_kwargs = json.loads(row["cache_kwargs"]) if isinstance(row.get("cache_kwargs"), str) else {}
    knobs = json.loads(row["system_kwargs"]) if isinstance(row.get("system_kwargs"), str) else {}
    cls = system_class(system)
    args = (row["cache"], cache_kwargs, knobs)
    row.update(label=cls.label(*args), method=cls.method(*args), peer=cls.peer(*args))
    row["schema_version"] = SCHEMA_VERSION
    return {k: v for k, v in row.items() if k in COLUMNS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a folder searched recursively for *.parquet")
    args = parser.parse_args()
    rewritten = 0
    for path in sorted(Path(args.folder).rglob("*.parquet")):
        old = pd.read_parquet(path)
        if len(old) and "schema_version" in old and (old["schema_version"] == SCHEMA_VERSION).all():
            continue
        rows = [upgrade({k: (None if pd.isna(v) else v) for k, v in r.items()}) for r in old.to_dict("records")]
        to_frame(rows).to_parquet(path, index=False)
        rewritten += 1
    print(f"{rewritten} files rewritten to schema {SCHEMA_VERSION}")


if __name__ == "__main__":
    main()
