"""A one-node Slurm cluster for the tests: munged, slurmctld and slurmd on 127.0.0.1 with a `debug` partition of this
machine's cores and memory, started by the fixture and stopped by it (each process it started ended by its pid).
Needs root (slurmd runs jobs as the user who submits them) and Debian's `slurm-wlm` and `munge` (.ci/run installs
them); skipped with the reason otherwise."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scancel")

SLURM_CONF = """\
ClusterName=kvbench
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={port}
SlurmdPort={port_d}
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=60
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def missing() -> str | None:
    """Why the cluster cannot start here (None: it can)."""
    if os.geteuid() != 0:
        return "a one-node Slurm cluster needs root (slurmd runs jobs as their user)"
    absent = [t for t in TOOLS if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing): apt-get install slurm-wlm munge"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The running cluster: `env` for the processes that submit to it (SLURM_CONF), `stop()` ends it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        host = socket.gethostname().split(".")[0]
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        for sub in ("state", "spool"):
            (root / sub).mkdir()
        conf = root / "slurm.conf"
        conf.write_text(
            SLURM_CONF.format(
                host=host,
                root=root,
                port=_free_port(),
                port_d=_free_port(),
                cpus=os.cpu_count(),
                memory=int(memory * 0.9),
            )
        )
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.env = {**os.environ, "SLURM_CONF": str(conf)}
        sbin = lambda name: shutil.which(name) or f"/usr/sbin/{name}"  # noqa: E731
        self._start(
            [
                sbin("munged"),
                "--foreground",
                "--force",
                f"--key-file={key}",
                f"--socket={root}/munge.socket",
                f"--pid-file={root}/munged.pid",
                f"--log-file={root}/munged.log",
                f"--seed-file={root}/seed",
            ]
        )
        self._wait(lambda: (root / "munge.socket").exists(), "munged's socket")
        self._start([sbin("slurmctld"), "-D", "-c", "-f", str(conf)])
        self._start([sbin("slurmd"), "-D", "-f", str(conf), "-N", host])
        self._wait(self._idle, "the node to be idle")

    def _start(self, command: list[str]) -> None:
        log = open(self.root / (Path(command[0]).name + ".out"), "wb")
        self.procs.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() in ("idle", "mix", "alloc")

    def _wait(self, ready, what: str, timeout: float = 60) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if any(p.poll() is not None for p in self.procs):
                break
            if ready():
                return
            time.sleep(0.5)
        logs = "\n".join(f"{p.name}: {p.read_text()[-500:]}" for p in self.root.glob("*.out"))
        self.stop()
        raise RuntimeError(f"the Slurm test cluster did not start ({what}):\n{logs}")

    def jobs(self) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T"], env=self.env, capture_output=True, text=True)
        return [line for line in out.stdout.splitlines() if line.strip()]

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for proc in reversed(self.procs):  # the processes this cluster started, each ended by its own pid
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()
