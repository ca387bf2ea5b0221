"""Hydra's submitit Slurm launcher as kvbench runs it (`hydra/launcher=submitit_slurm`), with three changes:

* a job that ends without a result (cancelled, preempted, over its `timeout_min`, its node lost) is a job without a
  row, not an error that ends the sweep: the launcher waits for every job, and `bench.run` then reports the
  missing ones (exit code 1; the same command again redoes exactly those);
* a sweep that runs on the CPU asks for no GPU: `gpus_per_task` (and `gpus_per_node`, `gres`) are dropped when
  `device=cpu`, or `device=auto` on a partition whose nodes have no GPU (`sinfo`'s generic resources);
* job states come from `squeue` where `sacct` cannot give them (accounting disabled, as on many small clusters):
  one line per sweep says so, instead of submitit's warning at every poll.
"""

from __future__ import annotations

import logging
import subprocess
import time
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher
from submitit.core.utils import FailedJobError, UncompletedJobError
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)
GPU_KEYS = ("gpus_per_task", "gpus_per_node", "gres")


class SqueueFallbackWatcher(SlurmInfoWatcher):
    """submitit's watcher, which asks sacct; where sacct fails, it asks squeue (running and pending jobs, one line
    per array task) and takes a job squeue no longer lists as finished (its result file then tells how)."""

    said = False

    def update(self) -> None:
        command = self._make_command()
        if command is None:
            return
        self._num_calls += 1
        try:
            self._output = subprocess.check_output(command, stderr=subprocess.PIPE)
            self._info_dict.update(self.read_info(self._output))
        except (subprocess.CalledProcessError, OSError) as err:
            if not SqueueFallbackWatcher.said:
                reason = getattr(err, "stderr", b"") or str(err).encode()
                first = reason.decode(errors="replace").strip().splitlines()[:1] or [str(err)]
                log.warning(f"sacct cannot give job states ({first[0]}): taking them from squeue")
                SqueueFallbackWatcher.said = True
            self._info_dict.update(self._from_squeue())
        self._last_status_check = time.time()
        for job_id in self._registered - self._finished:
            if self.is_done(job_id, mode="cache"):
                self._finished.add(job_id)

    def _from_squeue(self) -> dict[str, dict[str, str]]:
        pending = self._registered - self._finished
        try:
            out = subprocess.check_output(["squeue", "-h", "-r", "-o", "%i|%T"], stderr=subprocess.PIPE, text=True)
        except (subprocess.CalledProcessError, OSError):
            return {}
        listed = dict(line.split("|", 1) for line in out.splitlines() if "|" in line)
        return {job: {"State": listed.get(job, "COMPLETED").strip()} for job in pending}


SlurmJob.watcher = SqueueFallbackWatcher(delay_s=SlurmJob.watcher._delay_s)
_RESULTS = SlurmJob.results  # submitit's own


def _no_row(job: SlurmJob, why: str) -> JobReturn:
    """The JobReturn of a job that ended without a row: `bench.run` counts it as missing."""
    log.warning(f"Slurm job {job.job_id} ended without a row ({why[:200]})")
    result = JobReturn()
    result.status = JobStatus.COMPLETED
    result.return_value = {"status": "killed", "slurm_job_id": job.job_id}
    return result


def _robust_results(job: SlurmJob) -> list:
    """job.results(), where a job that ended without a result (killed, cancelled) or that the scheduler stopped from
    inside (submitit's time-limit signal raises UncompletedJobError in the job) is one JobReturn without a row."""
    try:
        returned = _RESULTS(job)
    except (UncompletedJobError, FailedJobError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return [_no_row(job, first)]
    stopped = lambda r: r.status == JobStatus.FAILED and isinstance(r._return_value, UncompletedJobError)  # noqa: E731
    return [_no_row(job, str(r._return_value)) if stopped(r) else r for r in returned]


def partition_has_gpus(partition: str | None) -> bool | None:
    """Whether `sinfo` lists a GPU among the partition's generic resources (None: sinfo could not say)."""
    command = ["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else [])
    try:
        out = subprocess.check_output(command, stderr=subprocess.PIPE, text=True, timeout=30)
    except (subprocess.CalledProcessError, OSError, subprocess.TimeoutExpired):
        return None
    return "gpu" in out


class SlurmLauncher(SubmititSlurmLauncher):
    def launch(self, job_overrides, initial_job_idx: int) -> Any:
        device = str(self.config.get("device", "auto"))
        cpu_only = device == "cpu" or (device == "auto" and partition_has_gpus(self.params.get("partition")) is False)
        if cpu_only:
            dropped = [k for k in GPU_KEYS if self.params.get(k)]
            for key in dropped:
                self.params[key] = None
            if dropped:
                log.info(f"the sweep runs on the CPU: {', '.join(dropped)} dropped")
        SlurmJob.results = _robust_results
        try:
            return super().launch(job_overrides, initial_job_idx)
        finally:
            SlurmJob.results = _RESULTS
