"""A job's own process: `python -m bench.harness.child FD`, started by `bench.harness.launch.run_in_child`.

Reads the pickled job from stdin, runs it, and writes its pickled row to file descriptor FD (a pipe to the
parent). It never writes a result file: the parent does, atomically, once the whole row has arrived.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys


def die_with_parent() -> None:
    """Linux: the kernel sends this process SIGKILL when its parent dies (a killed sweep, a preempted node), so
    no job outlives the sweep that started it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    parent = os.environ.get("KVBENCH_PARENT_PID")
    if parent and os.getppid() != int(parent):  # the parent died before the line above ran
        os._exit(1)


def main() -> None:
    die_with_parent()
    out_fd = int(sys.argv[1])
    job = pickle.load(sys.stdin.buffer)
    from bench.harness.job import run_job

    row = run_job(job["spec"], sweep_id=job["sweep_id"], config_hash=job["config_hash"], progress=job["progress"])
    with os.fdopen(out_fd, "wb") as out:
        pickle.dump(row, out)


if __name__ == "__main__":
    main()
