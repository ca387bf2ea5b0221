"""Every answer kept: one record per sample and question of a task-suite job, beside its row.

    <results_dir>/<sweep>/<config_hash>.parquet                   the job's row
    <results_dir>/<sweep>/records/<config_hash>/<task>.parquet    its answers to one task

A task's file is written whole and atomically once its samples are answered, so a killed sweep resumes at the first
task without one; the row's accuracies are means of these scores. Columns (RECORD): the sample (task, index, seed,
context length, haystack, where each target needle sits), the question, what was expected, what was generated, its
score, the tokens it took against the answer budget, the protocol and which prefill ran ("shared": recorded once and
loaded, "resumed": the cache's own past the first positions a recording holds, which attend alike, "own": the cache's
own). `load` joins them with the rows' configuration, so that a user can list what a cache
got wrong:

    records = load("results/leaderboard")
    records[(records.label == "snapkv") & (records.score < 1)][["task", "sample", "expected", "answer"]]
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

FOLDER = "records"
RECORD = {
    "config_hash": "string",
    "task": "string",
    "sample": "Int64",  # the sample's index (the same index is the same sample in every row of a sweep)
    "question": "Int64",  # the question's index within the sample
    "seed": "Int64",
    "ctx": "Int64",
    "haystack": "string",  # noise | prose | needles | list | code text
    "depth": "float64",  # where the question's target starts, as a fraction of the context (NaN: no single place)
    "depths": "string",  # every target's depth, comma-separated
    "expected": "string",  # the strings the answer must contain, " | "-joined
    "answer": "string",  # what was generated (up to the end-of-turn token)
    "score": "float64",  # RULER's string_match_all: the fraction of the expected strings the answer contains
    "answer_tokens": "Int64",  # tokens generated
    "answer_budget": "Int64",  # tokens allowed (its batch's longest expected answer, written out, plus a margin)
    "cut": "boolean",  # the answer took every token allowed (it may have been cut)
    "protocol": "string",
    "prefill": "string",  # shared | own
}


def folder(sweep_dir: str | Path, config_hash: str) -> Path:
    return Path(sweep_dir) / FOLDER / config_hash


def is_record_file(path: Path, root: Path) -> bool:
    """Whether a parquet file under `root` holds records (not a row)."""
    return FOLDER in path.relative_to(root).parts[:-1]


def frame(records: list[dict]) -> pd.DataFrame:
    import pandas as pd  # here: a job's process imports this module, and loads no dataframe library until it writes

    df = pd.DataFrame(records, columns=list(RECORD))
    return df.astype(RECORD)


def write(where: Path, task: str, records: list[dict]) -> Path:
    """One task's records, atomically (a temp file renamed over the final name)."""
    where.mkdir(parents=True, exist_ok=True)
    final = where / f"{task}.parquet"
    fd, tmp = tempfile.mkstemp(dir=where, prefix=f".{task}.", suffix=".tmp")
    os.close(fd)
    try:
        frame(records).to_parquet(tmp, index=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def read(where: Path, task: str) -> list[dict] | None:
    """One task's records, or None where that task has none yet."""
    import pandas as pd

    path = where / f"{task}.parquet"
    if not path.exists():
        return None
    return pd.read_parquet(path).astype(RECORD).to_dict("records")


def load(path: str | Path, rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every record under a results folder, each with its row's configuration (label, method, peer, system, cache,
    budget, ctx, model, protocol) joined on the config hash. Empty (with the columns) where there are none."""
    import pandas as pd

    from bench.results.rows import load as load_rows

    path = Path(path)
    files = sorted(p for p in path.rglob(f"{FOLDER}/*/*.parquet") if not p.name.startswith("."))
    df = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else frame([])
    df = df.astype(RECORD)
    rows = load_rows(path) if rows is None else rows
    keep = ["config_hash", "label", "method", "peer", "system", "cache", "cache_budget", "model", "status", "decode"]
    configs = rows[[c for c in keep if c in rows]].drop_duplicates("config_hash")
    if "decode" in configs and "system" in configs and configs["decode"].isna().any():
        configs = configs.assign(decode=configs["decode"].fillna(configs["system"].map(_own_mode)))
    return df.merge(configs, on="config_hash", how="left")


def _own_mode(system: str) -> str | None:
    """The decode mode a system runs unless asked for another: what a row written without the column ran."""
    from bench.systems import system_class

    try:
        return system_class(system).decode_modes[0]
    except KeyError:  # a system this checkout does not have
        return None
