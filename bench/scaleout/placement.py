"""Where a job may run: which Hydra launcher runs it and how many jobs share the machine (`placement`), and one GPU
per job (`gpu_lock`: a lock file per GPU, `flock`, released when the process holding it dies; the job's process then
sees only that GPU through CUDA_VISIBLE_DEVICES). So `hydra/launcher=joblib` with one worker per GPU runs one job per
GPU, and extra workers wait for a free one."""

from __future__ import annotations

import errno
import fcntl
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

_LAUNCHERS = {
    "BasicLauncher": "basic",
    "JoblibLauncher": "joblib",
    "LocalLauncher": "submitit_local",
    "SlurmLauncher": "submitit_slurm",
}
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
