"""Memory trackers. Each answers a different question, and a run reports all of them:

* `TensorTracker` (CPU): exact peak of live tensor bytes, counted op by op. Deterministic from run to run, so CI
  can compare it exactly. It sees the tensors ops return (not a kernel's private scratch space).
* `peak_rss` (CPU): the process's peak resident set (VmHWM), reset before each phase through
  /proc/self/clear_refs. Includes the allocator's pools, the Python heap and libraries.
* `rss_file` (CPU): the file-backed part of the resident set (RssFile), mostly the shared libraries' code. How many
  of their pages count depends on the kernel's page cache, not on the job (README: what one run measures); this
  says how much of a peak was file-backed.
* `CudaPeaks` (GPU): torch's max_memory_allocated / max_memory_reserved, reset per phase.
* `bench.nvml_sampler.NvmlSampler` (GPU): a separate process reading NVML every 5 ms: this process's memory where
  NVML reports it, else device used minus the level before the run. This is what nvidia-smi shows: it includes
  the CUDA context, cuBLAS/cuDNN workspaces and the caching allocator's reserve.
"""

from __future__ import annotations

import gc
import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# ---- CPU -------------------------------------------------------------------------------------------------------


class TensorTracker(TorchDispatchMode):
    """Live bytes of tensors created inside the mode, and their peak.

    Every op output whose storage is new is counted until the last tensor viewing that storage is garbage
    collected (weakref finalizers). `baseline` adds bytes that were alive before (weights, caches, inputs) so that
    `peak` is a whole-process figure of tensor memory.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """torch wraps a mode's __torch_dispatch__ to keep the compiler out of it, and that wrapper imports
        torch._dynamo on its first call, seconds and memory in every job process for a mode that never runs
        compiled (the tracked pass is eager). Opting out leaves __torch_dispatch__ a plain method."""
        return False

    def __init__(self, baseline: int = 0) -> None:
        super().__init__()
        self.baseline = baseline
        self.live = 0
        self.peak_dynamic = 0
        self._storages: dict[int, list] = {}  # storage data_ptr -> [nbytes, n_live_tensors]

    @property
    def peak(self) -> int:
        return self.baseline + self.peak_dynamic

    def reset_peak(self) -> None:
        self.peak_dynamic = self.live

    def _release(self, ptr: int) -> None:
        entry = self._storages.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        input_ptrs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            entry = self._storages.get(ptr)
            if entry is None:
                if input_ptrs is None:
                    leaves = tree_leaves((args, kwargs or {}))
                    input_ptrs = {x.untyped_storage().data_ptr() for x in leaves if isinstance(x, torch.Tensor)}
                if ptr in input_ptrs:
                    continue  # in place, or a view of memory that existed before the mode: nothing new
                entry = self._storages[ptr] = [storage.nbytes(), 0]
                self.live += entry[0]
                self.peak_dynamic = max(self.peak_dynamic, self.live)
            entry[1] += 1  # one more tensor keeps this storage alive
            weakref.finalize(t, self._release, ptr)
        return out


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    """One `kB` field of /proc/self/status in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int | None:
    """Peak resident set size in bytes since the last reset (VmHWM), or None off Linux."""
    return _status_bytes("VmHWM")


def rss_file() -> int | None:
    """Resident file-backed bytes now (RssFile: mapped library and data files), or None off Linux."""
    return _status_bytes("RssFile")


# ---- GPU -------------------------------------------------------------------------------------------------------


class CudaPeaks:
    """torch's allocator peaks for one phase: `with CudaPeaks(dev) as p: ...; p.allocated, p.reserved`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.allocated = self.reserved = None

    def __enter__(self) -> CudaPeaks:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.allocated = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)


def release_warmup_memory(device: torch.device) -> int | None:
    """After a warm-up, before the measured phases: hand back to the driver what the caching allocator keeps
    from it, which would otherwise count in reserved and NVML figures for the whole run. Compiling can allocate
    once-only memory (inductor allocates example inputs for a kernel it benchmarks), and manual CUDA graphs warm
    up on a side stream whose cached blocks the main stream does not reuse (results/baselines/h200/README.md).
    Nothing a measured phase allocates is released: this runs before them. Returns the bytes handed back (None off
    CUDA)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_reserved(device)
    torch.cuda.empty_cache()
    return before - torch.cuda.memory_reserved(device)


ALLOC_CONF_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # the newer name first


def request_expandable_segments(on: bool) -> str:
    """Ask the CUDA caching allocator for expandable segments (on) or fixed-size ones (off), keeping the user's
    other allocator options. Expandable segments grow one mapping instead of caching blocks of the sizes first
    asked for, so memory freed after prefill is reused by any later size: reserved (and NVML) stay near
    allocated. The setting is read when the allocator starts: before that it goes through the environment
    (the documented way); after, through torch's runtime setter where this torch has one. Returns the option
    string asked for; what the allocator did is `expandable_segments_seen`."""
    var = next((v for v in ALLOC_CONF_VARS if os.environ.get(v)), "PYTORCH_CUDA_ALLOC_CONF")
    options = [o for o in os.environ.get(var, "").split(",") if o and not o.startswith("expandable_segments")]
    conf = ",".join([*options, f"expandable_segments:{on}"])
    if not torch.cuda.is_initialized():
        os.environ[var] = conf
        return conf
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    setter = setter or getattr(torch._C, "_cuda_cudaCachingAllocator_set_allocator_settings", None)
    if setter is not None:
        setter(f"expandable_segments:{on}")
    return conf


def expandable_segments_seen(device: torch.device) -> bool | None:
    """Whether the allocator's segments on `device` are expandable (None: no segment, or this torch does not say)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    flags = [s.get("is_expandable") for s in torch.cuda.memory_snapshot() if s.get("device") == index]
    flags = [f for f in flags if f is not None]
    return any(flags) if flags else None


def nvml_index(device: torch.device) -> int:
    """NVML's index of a CUDA device. NVML numbers every GPU of the machine; torch numbers only those
    CUDA_VISIBLE_DEVICES shows (a job under bench.launch sees one GPU, as cuda:0), so match them by UUID."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not os.environ.get("CUDA_VISIBLE_DEVICES"):
        return index
    import pynvml as nvml

    nvml.nvmlInit()
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
        return int(nvml.nvmlDeviceGetIndex(nvml.nvmlDeviceGetHandleByUUID(uuid)))
    except (AttributeError, nvml.NVMLError):  # an old torch without .uuid: the visible list's entry itself
        entry = os.environ["CUDA_VISIBLE_DEVICES"].split(",")[index].strip()
        return int(entry) if entry.isdigit() else int(nvml.nvmlDeviceGetIndex(nvml.nvmlDeviceGetHandleByUUID(entry)))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


_BANDWIDTH: dict[str, float] = {}


def measured_bandwidth(device: torch.device, nbytes: int = 1 << 30, copies: int = 10, trials: int = 5) -> float | None:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), measured once per device and process: the
    best of `trials` batches of `copies` back-to-back copies of nbytes / 2 bytes, timed by CUDA events on the
    device: timed from the host with a synchronisation per copy, the host's share would count as copy time, which
    lowers the bandwidth and raises every mbu."""
    if device.type != "cuda":
        return None
    key = str(device)
    if key not in _BANDWIDTH:
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        stream = torch.cuda.current_stream(device)
        for _ in range(3):
            dst.copy_(src)
        best = float("inf")
        for _ in range(trials):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for _ in range(copies):
                dst.copy_(src)
            end.record(stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3 / copies)  # seconds per copy
        _BANDWIDTH[key] = 2 * src.numel() / best
        del src, dst
        torch.cuda.empty_cache()
    return _BANDWIDTH[key]
