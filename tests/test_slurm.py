"""The cluster path on a real (one-node) Slurm: a sweep submitted, run and collected; a job cancelled mid-run (a
preemption) or over its time limit leaves no row and no temp file, is reported missing, and the rerun redoes exactly
it; array_parallelism=1 runs one job at a time; no GPU is asked for on the CPU; sacct's absence is one line.
Run by `make test-slurm` (CI's second step); skipped where Slurm is not installed or the user is not root."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from slurm_cluster import slurm  # noqa: F401  (the fixture)

from bench.results import rows

pytestmark = pytest.mark.slurm
ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug"]


def sweep(cluster, tmp_path: Path, *args: str, background: bool = False):
    env = {**cluster.env, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench.run", *CLUSTER, *args, f"results_dir={tmp_path / 'results'}", "-m"]
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def sweep_rows(tmp_path: Path, sweep_name: str = "default"):
    return rows.load(tmp_path / "results" / sweep_name)


def _running(cluster, timeout: float = 120) -> list[str]:
    """Slurm jobs RUNNING once one is (the sweep's first job has started)."""
    end = time.time() + timeout
    while time.time() < end:
        running = [line.split("|")[0] for line in cluster.jobs() if line.endswith("RUNNING")]
        if running:
            return running
        time.sleep(0.5)
    raise AssertionError("no job started")


def test_the_readme_command_runs_two_jobs_as_two_slurm_jobs(slurm, tmp_path):  # noqa: F811
    """The README's cluster line with this cluster's partition: no GPU asked for on the CPU (dropped, not an
    error), two rows from two Slurm tasks of one array, and at most one line about sacct (accounting is off)."""
    proc = sweep(slurm, tmp_path, "cache=dense,last_recent", "ctx=1k", "new_tokens=4", "repeats=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = sweep_rows(tmp_path)
    assert sorted(df["cache"]) == ["dense", "last_recent"] and (df["status"] == "ok").all(), df["error"]
    assert df["slurm_job_id"].nunique() == 2 and sorted(df["slurm_array_task_id"]) == ["0", "1"]
    assert (df["launcher"] == "submitit_slurm").all() and (df["isolation"] == "launcher").all()
    assert df["hostname"].notna().all()
    assert proc.stderr.count("sacct") <= 1, proc.stderr
    sbatch = next((tmp_path / "results" / "default" / "hydra").rglob("*_submission.sh")).read_text()
    assert "--gpus-per-task" not in sbatch and "--partition=debug" in sbatch


def test_a_cancelled_job_is_missing_and_the_rerun_redoes_exactly_it(slurm, tmp_path):  # noqa: F811
    """scancel on the first job while it runs (a preemption): the sweep goes on with the other, ends with exit 1
    naming one job without a row; the cancelled job left no parquet and no temp file; the same command again runs
    only it. array_parallelism=1: the two jobs never run at once."""
    args = ["cache=dense,last_recent", "ctx=8k", "repeats=6", "new_tokens=16", "hydra.launcher.array_parallelism=1"]
    proc = sweep(slurm, tmp_path, *args, background=True)
    seen: list[int] = []
    watching = threading.Event()

    def watch():
        while not watching.is_set():
            seen.append(sum(line.endswith("RUNNING") for line in slurm.jobs()))
            time.sleep(0.3)

    watcher = threading.Thread(target=watch)
    watcher.start()
    first = _running(slurm)[0]
    subprocess.run(["scancel", first], env=slurm.env, check=True)
    out, err = proc.communicate(timeout=600)
    watching.set()
    watcher.join()
    assert proc.returncode == 1 and "1 of 2 jobs have no row" in err, (out[-2000:], err[-2000:])
    assert max(seen) == 1  # one at a time
    folder = tmp_path / "results" / "default"
    kept = list(folder.glob("*.parquet"))
    assert len(kept) == 1 and not list(folder.glob(".*.tmp"))
    stamp = kept[0].stat().st_mtime_ns
    rerun = sweep(slurm, tmp_path, *args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(sweep_rows(tmp_path)["cache"]) == ["dense", "last_recent"]
    assert kept[0].stat().st_mtime_ns == stamp  # the job that had its row was skipped, not redone


def test_a_job_over_its_time_limit_is_missing_too(slurm, tmp_path):  # noqa: F811
    """timeout_min=1 against a job of minutes: Slurm signals it ahead of the limit (submitit's signal_delay_s) and the
    job stops; no row, exit 1, nothing half-written."""
    args = ["cache=dense", "ctx=32k", "repeats=20", "new_tokens=64", "hydra.launcher.timeout_min=1"]
    proc = sweep(slurm, tmp_path, *args)
    assert proc.returncode == 1 and "1 of 1 jobs have no row" in proc.stderr, proc.stderr[-2000:]
    folder = tmp_path / "results" / "default"
    assert not list(folder.glob("*.parquet")) and not list(folder.glob(".*.tmp"))


def test_no_gpu_flags_on_the_cpu(slurm, monkeypatch):  # noqa: F811
    """The check behind dropping gpus_per_task: this cluster's partition has no GPU."""
    from bench.scaleout.slurm import partition_has_gpus

    monkeypatch.setenv("SLURM_CONF", slurm.env["SLURM_CONF"])
    assert partition_has_gpus("debug") is False
    assert os.environ["SLURM_CONF"].endswith("slurm.conf")
