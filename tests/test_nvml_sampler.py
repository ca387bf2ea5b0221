"""The NVML sampler's process and peak logic, against a stand-in pynvml whose readings the test controls
(CPU machines have no NVML)."""

import textwrap
import time

import pytest

from bench.measure.nvml_sampler import NvmlSampler

FAKE = textwrap.dedent("""
    import os
    from types import SimpleNamespace

    class NVMLError(Exception):
        pass

    def _read():
        with open(os.environ["FAKE_NVML_FILE"]) as f:
            return int(f.read() or 0)

    def nvmlInit(): pass
    def nvmlShutdown(): pass
    def nvmlDeviceGetHandleByIndex(i): return i
    def nvmlDeviceGetMemoryInfo(h): return SimpleNamespace(used=1000 + _read())  # another process holds 1000
    def nvmlDeviceGetComputeRunningProcesses(h):
        if os.environ.get("FAKE_NVML_NO_PROCS"):
            return []
        return [SimpleNamespace(pid=int(os.environ["FAKE_NVML_PID"]), usedGpuMemory=_read())]
""")


@pytest.fixture
def fake_nvml(tmp_path, monkeypatch):
    (tmp_path / "pynvml.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    reading = tmp_path / "used"
    reading.write_text("100")
    monkeypatch.setenv("FAKE_NVML_FILE", str(reading))
    monkeypatch.setenv("FAKE_NVML_PID", str(__import__("os").getpid()))
    return reading


def _drive(reading, values):
    for v in values:
        reading.write_text(str(v))
        time.sleep(0.05)


def test_process_memory_peak(fake_nvml):
    sampler = NvmlSampler(0, period_s=0.002).start()
    _drive(fake_nvml, [300, 5000, 200])
    assert sampler.stop() == 5000
    assert sampler.source == "process" and sampler.samples > 10


def test_device_minus_baseline_when_processes_are_invisible(fake_nvml, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_NO_PROCS", "1")
    sampler = NvmlSampler(0, period_s=0.002, baseline_used=1000).start()  # device used 1000 + 100 at start
    _drive(fake_nvml, [700, 100])
    assert sampler.stop() == 700 and sampler.source == "device_minus_baseline"
