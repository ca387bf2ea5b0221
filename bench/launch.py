"""Where a job runs: in a process of its own (the default), or in the process Hydra's launcher gave it.

Honest memory figures need a fresh process per job: no allocator pool, compiled graph, loaded library or heap
fragmentation carried over from the previous job. `isolate=true` (default) gets one of two ways:

* `process`: the launcher's process starts `python -m bench.child`, hands it the job and waits for its row. This
  is what happens under the basic launcher and joblib (whose workers serve many jobs each). Costs an interpreter
  start and the imports: `spawn_overhead_s` in the row (about 1.3 s on the project's 2-core CPU).
* `launcher`: submitit runs each job in a new process already (one Slurm task, or one local subprocess), so the
  job runs there, unless that process must pick one of several GPUs (then `process` again).

`isolate=false` runs every job in the launcher's process (`none`): quick runs, and the pretrained weights loaded
once per process. The row's `isolation` and `launcher` columns say which.

On CUDA every job takes one GPU for itself: a lock file per GPU (`flock`, released when the process holding it
dies), and the child sees only that GPU (`CUDA_VISIBLE_DEVICES`). So `hydra/launcher=joblib` with one worker per
GPU runs one job per GPU, and extra workers wait for a free one.

A child killed from outside (SIGKILL, SIGTERM, a preempted node, a killed sweep: the child dies with its parent)
leaves no row, so running the sweep again redoes exactly the missing jobs. A child that crashes (SIGSEGV, a
non-zero exit) gets a row with status `error`; one the kernel's OOM killer took gets status `oom`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from bench.spec import JobSpec

ROOT = Path(__file__).resolve().parents[1]
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
_LAUNCHERS = {
    "BasicLauncher": "basic",
    "JoblibLauncher": "joblib",
    "LocalLauncher": "submitit_local",
    "SlurmLauncher": "submitit_slurm",
}
CHILD_ARGS = ["-m", "bench.child"]  # after sys.executable; the pipe's file descriptor follows
_jobs_in_this_process = 0
# conf/hydra/launcher/{joblib,submitit_*}.yaml set every field of the plugin's schema of the same name, on purpose:
# `hydra/launcher=joblib` then means our defaults. Hydra warns that it matches them to that schema; that is wanted.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")


def cuda_devices() -> list[str]:
    """The GPUs this process may hand out: its CUDA_VISIBLE_DEVICES entries, else 0..count-1."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def parallel_jobs_default() -> int:
    """conf/hydra/launcher/joblib.yaml's n_jobs: one worker per GPU, or two on a CPU machine (cores split)."""
    return len(cuda_devices()) or 2


OmegaConf.register_new_resolver("kvbench_parallel_jobs", parallel_jobs_default, replace=True)
OmegaConf.register_new_resolver("kvbench_gpus", lambda: len(cuda_devices()), replace=True)


@dataclass
class Placement:
    launcher: str  # basic | joblib | submitit_local | submitit_slurm (or the launcher class name)
    parallel: int  # jobs that may run at once on this machine (joblib's n_jobs; else 1)
    cpus: int | None  # CPU threads per job when the launcher decides them (None: torch's default)


def placement() -> Placement:
    """The launcher running this job, read from Hydra's config (basic when called outside Hydra)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        launcher = HydraConfig.get().launcher
    except (ImportError, ValueError):
        return Placement("basic", 1, None)
    target = str(launcher.get("_target_", ""))
    name = _LAUNCHERS.get(target.rsplit(".", 1)[-1], target.rsplit(".", 1)[-1] or "basic")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if name == "joblib":
        n_jobs = int(launcher.get("n_jobs") or 1)
        parallel = cores if n_jobs < 0 else n_jobs
        return Placement(name, parallel, max(1, cores // parallel) if parallel > 1 else None)
    if name.startswith("submitit"):
        cpus = launcher.get("cpus_per_task") or _slurm_cpus()
        return Placement(name, 1, int(cpus) if cpus else None)
    return Placement(name, 1, None)


def _slurm_cpus() -> int | None:
    """The CPUs Slurm gave this job (where it ran without --cpus-per-task), None outside Slurm."""
    given = os.environ.get("SLURM_CPUS_PER_TASK") or os.environ.get("SLURM_JOB_CPUS_PER_NODE", "").split("(")[0]
    return int(given) if given.isdigit() else None


def execute(spec: JobSpec, sweep_id: str, config_hash: str, isolate: bool = True, progress: bool = True) -> dict | None:
    """Run one job where `isolate` and the launcher say; its row, or None when its process was killed from
    outside (nothing to write: a rerun redoes it)."""
    global _jobs_in_this_process
    from bench.job import run_job

    where = placement()
    if spec.device == "cpu" and spec.threads is None and where.cpus:
        spec = replace(spec, threads=where.cpus)  # the cores split between the jobs running at once
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


# ---- one GPU per job ------------------------------------------------------------------------------------------


@contextmanager
def gpu_lock(device: str, poll_s: float = 0.2) -> Iterator[str | None]:
    """Hold one GPU of this machine for the duration of a job: the first whose lock file is free (waits while
    none is). Yields its CUDA_VISIBLE_DEVICES entry, or None on CPU."""
    if device != "cuda":
        yield None
        return
    gpus = cuda_devices()
    if not gpus:
        raise RuntimeError("device=cuda but no GPU is visible to this process")
    folder = Path(tempfile.gettempdir()) / f"kvbench-gpu-locks-{os.getuid()}"
    folder.mkdir(exist_ok=True)
    while True:
        for gpu in gpus:
            fd = os.open(folder / f"gpu-{gpu}.lock", os.O_CREAT | os.O_RDWR, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                continue
            try:
                yield gpu
            finally:
                os.close(fd)  # releases the lock
            return
        time.sleep(poll_s)


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
    from bench.job import base_row

    row = base_row(spec, sweep_id, config_hash, probe_device=False)
    row.update(pid=pid, status=status, error=error, total_s=wall)
    return row
