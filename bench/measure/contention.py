"""What else used the machine while a job measured: a row's timings are only as good as the machine was quiet.

    monitor = ContentionMonitor(threads=torch.get_num_threads(), gpu=nvml_index).start()
    ...                                   # the timed phases
    row.update(asdict(monitor.stop()))    # contention, others_cpu, load_start, ...

From /proc/stat (every CPU's busy time) less this process's own CPU time (/proc/self/stat, threads and children
included) over the wall time: how many cores' worth other processes used (`others_cpu`), and the hypervisor's
steal (`cpu_steal`, time the machine's CPUs were taken by other guests). Beside them the load average at start and
end, the cores this process may run on (affinity and the cgroup's CPU quota), the torch threads it runs, and on
CUDA the other processes on its GPU and their memory (NVML).

`contention` sums it up:

* `none`: other processes (and the hypervisor's steal) took under 5% of the cores this job may use, nothing else ran
  on its GPU, and its threads plus the others' load fit the cores;
* `heavy`: they took 30% or more of them, or another process computed on its GPU;
* `some`: anything between, including threads oversubscribed (this job's threads plus the others' busy cores
  exceed the cores).

The thresholds come from what they do to a step (docs/timing.md has the measurements).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

SOME, HEAVY = 0.05, 0.30  # others' share of the cores this job may use
LEVELS = ("none", "some", "heavy")


@dataclass
class Contention:
    contention: str  # none | some | heavy
    others_cpu: float | None  # cores' worth of CPU other processes used, on average over the timed phases
    cpu_steal: float | None  # cores' worth of steal (another guest of the hypervisor ran)
    load_start: float | None  # 1-minute load average
    load_end: float | None
    cores: int  # cores this process may use (affinity, cgroup quota)
    oversubscribed: bool  # the job's threads + others' busy cores > cores
    gpu_others: int | None = None  # other processes on this job's GPU
    gpu_others_bytes: int | None = None  # their GPU memory


def cores_allowed() -> int:
    """Cores this process may use: its CPU affinity, capped by the cgroup's CPU quota (cpu.max) where one is set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()
        if quota != "max":
            cores = min(cores, max(1, int(-(-int(quota) // int(period)))))
    except (OSError, ValueError):
        pass
    return cores


def _cpu_times() -> tuple[float, float, float] | None:
    """(seconds every CPU was busy, seconds of steal, seconds this process (threads, waited children) used)."""
    try:
        fields = open("/proc/stat").readline().split()[1:]
        ticks = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        busy = (user + nice + system + irq + softirq) / ticks
        own = os.times()
        return busy, steal / ticks, own.user + own.system + own.children_user + own.children_system
    except (OSError, ValueError):
        return None


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def classify(
    others_cpu: float | None, cores: int, threads: int, gpu_others: int | None, steal: float | None = None
) -> tuple[str, bool]:
    """(contention level, oversubscribed) from the measured figures (thresholds in the module's docstring)."""
    share = ((others_cpu or 0.0) + (steal or 0.0)) / max(1, cores)
    oversubscribed = threads + (others_cpu or 0.0) > cores + 0.5
    if share >= HEAVY or (gpu_others or 0) > 0:
        return "heavy", oversubscribed
    if share >= SOME or oversubscribed:
        return "some", oversubscribed
    return "none", oversubscribed


def others_busy(seconds: float = 0.5) -> float | None:
    """Cores' worth of CPU other processes use now, sampled over `seconds` (this process asleep meanwhile)."""
    first = _cpu_times()
    time.sleep(seconds)
    last = _cpu_times()
    if first is None or last is None:
        return None
    return max(0.0, (last[0] - first[0]) - (last[2] - first[2])) / seconds


class ContentionMonitor:
    def __init__(self, threads: int, gpu: int | None = None) -> None:
        self.threads, self.gpu = threads, gpu

    def start(self) -> ContentionMonitor:
        self.t0, self.times0, self.load0 = time.perf_counter(), _cpu_times(), _load()
        return self

    def stop(self) -> Contention:
        wall = time.perf_counter() - self.t0
        times1 = _cpu_times()
        others = steal = None
        if self.times0 is not None and times1 is not None and wall > 0:
            others = max(0.0, (times1[0] - self.times0[0]) - (times1[2] - self.times0[2])) / wall
            steal = (times1[1] - self.times0[1]) / wall
        gpu_others, gpu_bytes = gpu_neighbours(self.gpu) if self.gpu is not None else (None, None)
        cores = cores_allowed()
        level, oversubscribed = classify(others, cores, self.threads, gpu_others, steal)
        return Contention(level, others, steal, self.load0, _load(), cores, oversubscribed, gpu_others, gpu_bytes)


def gpu_neighbours(index: int) -> tuple[int | None, int | None]:
    """(other processes computing on NVML device `index`, their memory in bytes), None where NVML cannot say."""
    try:
        import pynvml as nvml

        nvml.nvmlInit()
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        procs = [p for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle) if p.pid != os.getpid()]
        return len(procs), sum(p.usedGpuMemory or 0 for p in procs)
    except Exception:  # noqa: BLE001 - no NVML, no permission: unknown, not zero
        return None, None
