"""GPU memory as nvidia-smi sees it, sampled every `period_s` by a separate process.

What sampling costs a decode step is measured in results/baselines/h200/README.md (the default period, 5 ms, costs
nothing measurable there). A process rather than a thread keeps the sampler off the GIL; this module imports no
torch, so the spawned child starts in a fraction of a second.

The figure is this process's memory where NVML reports it per process (`source="process"`): device used minus
what the other processes hold, the latter re-read every 0.25 s; else the device's used memory minus its level
before the run (`source="device_minus_baseline"`).
"""

from __future__ import annotations

import multiprocessing as mp
import os


def _used_by(nvml, handle, pid: int) -> int | None:
    try:
        procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except nvml.NVMLError:
        return None
    for p in procs:
        if p.pid == pid and p.usedGpuMemory is not None:
            return int(p.usedGpuMemory)
    return None


def _loop(pid: int, index: int, period_s: float, baseline: int | None, ready, stop, result) -> None:
    """Fast samples read only the device's used memory (a cheap NVML call). This process's share is that minus
    what the other processes use, re-read from NVML's process list every `refresh_s` (listing processes is the
    expensive call, and the one that can stall the driver)."""
    import time

    import pynvml as nvml

    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    used = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
    if baseline is None:
        baseline = used
    refresh_s, refreshed = 0.25, 0.0
    others = None  # bytes used by other processes (None: NVML cannot attribute memory to this process)
    source, peak, samples = "process", 0, 0
    while True:
        used = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        now = time.monotonic()
        if source == "process" and now - refreshed >= refresh_s:
            mine = _used_by(nvml, handle, pid)
            if mine is None:
                source = "device_minus_baseline"
            else:
                others, refreshed = used - mine, now
        value = used - others if source == "process" else used - baseline
        peak, samples = max(peak, value), samples + 1
        if samples == 1:
            ready.set()
        if stop.wait(period_s) or os.getppid() != pid:  # stopped, or the job's process died (killed)
            break
    try:
        result.send((peak, source, samples))
    except OSError:  # the job's process is gone
        pass
    nvml.nvmlShutdown()


class NvmlSampler:
    """`s = NvmlSampler(0, 0.005).start(); ...; peak = s.stop()`; then `s.source`, `s.samples`."""

    def __init__(self, device_index: int = 0, period_s: float = 0.005, baseline_used: int | None = None) -> None:
        self.device_index = device_index
        self.period_s = period_s
        self.baseline_used = baseline_used  # device used bytes before the run (default: when sampling starts)
        self.peak: int | None = None
        self.source: str | None = None
        self.samples = 0
        self._proc = None

    def start(self) -> NvmlSampler:
        ctx = mp.get_context("spawn")  # never fork a process that holds a CUDA context
        self._ready, self._stop = ctx.Event(), ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        args = (os.getpid(), self.device_index, self.period_s, self.baseline_used, self._ready, self._stop, send)
        self._proc = ctx.Process(target=_loop, args=args, name="kvbench-nvml", daemon=True)
        self._proc.start()
        if not self._ready.wait(timeout=30):
            self._proc.kill()
            raise RuntimeError("the NVML sampler process did not start")
        return self

    def stop(self) -> int:
        self._stop.set()
        self.peak, self.source, self.samples = self._recv.recv()
        self._proc.join(timeout=10)
        return self.peak


def driver_version() -> str:
    import pynvml as nvml

    nvml.nvmlInit()
    version = nvml.nvmlSystemGetDriverVersion()
    return version.decode() if isinstance(version, bytes) else str(version)


def device_used(index: int = 0) -> int:
    """Bytes in use on the device now (all processes)."""
    import pynvml as nvml

    nvml.nvmlInit()
    return int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index)).used)
