"""Where a job runs: in a process of its own (the default), or in the process Hydra's launcher gave it.

Honest memory figures need a fresh process per job: no allocator pool, compiled graph, loaded library or heap
fragmentation carried over from the previous job. `isolate=true` (default) gets one of two ways:

* `process`: the launcher's process starts `python -m bench.harness.child`, hands it the job and waits for its row. This
  is what happens under the basic launcher and joblib (whose workers serve many jobs each). Costs an interpreter
  start and the imports: `spawn_overhead_s` in the row.
* `launcher`: submitit runs each job in a new process already (one Slurm task, or one local subprocess), so the
  job runs there, unless that process must pick one of several GPUs (then `process` again).

`isolate=false` runs every job in the launcher's process (`none`): quick runs, and the pretrained weights loaded
once per process. The row's `isolation` and `launcher` columns say which.

On CUDA every job takes one GPU for itself (bench/scaleout/placement.py, `gpu_lock`).

A child killed from outside (SIGKILL, SIGTERM, a preempted node, a killed sweep: the child dies with its parent)
leaves no row, so running the sweep again redoes exactly the missing jobs. A child that crashes (SIGSEGV, a
non-zero exit) gets a row with status `error`; one the kernel's OOM killer took gets status `oom`.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.config.spec import JobSpec
from bench.scaleout.placement import cuda_devices, gpu_lock, placement

ROOT = Path(__file__).resolve().parents[2]
# Signals that mean "stopped from outside" rather than "the job crashed": no row, so a rerun redoes the job.
OUTSIDE_SIGNALS = {
    signal.SIGKILL,
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
}
CHILD_ARGS = ["-m", "bench.harness.child"]  # after sys.executable; the pipe's file descriptor follows
_jobs_in_this_process = 0


def execute(spec: JobSpec, sweep_id: str, config_hash: str, isolate: bool = True, progress: bool = True) -> dict | None:
    """Run one job where `isolate` and the launcher say; its row, or None when its process was killed from
    outside (nothing to write: a rerun redoes it)."""
    global _jobs_in_this_process
    from bench.harness.job import run_job

    where = placement()
    if spec.device == "cpu" and spec.threads is None and where.cpus:
        spec = replace(spec, settings=replace(spec.settings, threads=where.cpus))  # the cores split between jobs
    fresh = _jobs_in_this_process == 0 and where.launcher.startswith("submitit")
    one_gpu = spec.device != "cuda" or len(cuda_devices()) <= 1
    isolation = "none" if not isolate else "launcher" if fresh and one_gpu else "process"
    if isolation == "process":
        with gpu_lock(spec.device) as gpu:
            row = run_in_child(spec, sweep_id, config_hash, progress, gpu)
    else:
        _jobs_in_this_process += 1
        row = run_job(spec, sweep_id=sweep_id, config_hash=config_hash, progress=progress)
    if row is not None:
        row.update(isolation=isolation, launcher=where.launcher)
    return row


# ---- a process per job ----------------------------------------------------------------------------------------


def oom_kills() -> int | None:
    """The kernel's count of OOM kills since boot (/proc/vmstat), None where it is not readable."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def run_in_child(spec: JobSpec, sweep_id: str, config_hash: str, progress: bool, gpu: str | None) -> dict | None:
    """Run the job in `python -m bench.child` and return its row (sent back through a pipe, never a file).
    The child inherits stdout/stderr (progress bars) and dies with this process."""
    read_fd, write_fd = os.pipe()
    env = {**os.environ, "KVBENCH_PARENT_PID": str(os.getpid())}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    payload = pickle.dumps({"spec": spec, "sweep_id": sweep_id, "config_hash": config_hash, "progress": progress})
    oom_before = oom_kills()
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(
            [sys.executable, *CHILD_ARGS, str(write_fd)], stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env, cwd=ROOT
        )
    finally:
        os.close(write_fd)
    try:
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:  # the child died at once; its exit code tells why
            pass
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()  # until the child exits (it holds the only write end)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # this process is being interrupted: do not leave the job running
            proc.kill()
            proc.wait()
    wall = time.perf_counter() - t0
    if code == 0 and data:
        row = pickle.loads(data)
        row["spawn_overhead_s"] = wall - row["total_s"]
        return row
    if code < 0 and signal.Signals(-code) == signal.SIGKILL and oom_before is not None and oom_kills() > oom_before:
        why = "the job's process was killed by the kernel's OOM killer (/proc/vmstat oom_kill rose)"
        return _dead_row(spec, sweep_id, config_hash, proc.pid, wall, "oom", why)
    if code < 0 and signal.Signals(-code) in OUTSIDE_SIGNALS:
        return None
    why = f"died of {signal.Signals(-code).name}" if code < 0 else f"exited with code {code} without a row"
    return _dead_row(spec, sweep_id, config_hash, proc.pid, wall, "error", f"the job's process {why}")


def _dead_row(spec: JobSpec, sweep_id: str, config_hash: str, pid: int, wall: float, status: str, error: str) -> dict:
    from bench.harness.job import base_row

    row = base_row(spec, sweep_id, config_hash, probe_device=False)
    row.update(pid=pid, status=status, error=error, total_s=wall)
    return row
