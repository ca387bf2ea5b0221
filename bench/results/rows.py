"""Result rows: atomic one-file-per-job writes, loading a folder tree, resume by config hash (the schema:
bench/results/schema.py).

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

if TYPE_CHECKING:  # pandas is imported where frames are made: a job's own process writes no frame and never loads it
    import pandas as pd

from bench.results.schema import COLUMNS


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

    for col, dtype in COLUMNS.items():
        if col not in df:
            df[col] = pd.Series([None] * len(df), dtype=dtype)
        else:
            df[col] = df[col].astype(dtype)
    extra = [c for c in df.columns if c not in COLUMNS]
    return df[list(COLUMNS) + extra]


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
    from bench.results.records import is_record_file

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))
    files = [f for f in files if f == path or not is_record_file(f, path)]  # answers beside the rows, not rows
    if not files:
        return to_frame([])
    frames = [pd.read_parquet(f) for f in files]
    frames = [f for f in frames if len(f)]
    if not frames:
        return to_frame([])
    return _typed(pd.concat(frames, ignore_index=True))
