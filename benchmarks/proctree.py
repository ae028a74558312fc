"""A worker's whole process tree as the benchmarks report it: memory, and
the CPU it used (which varies far less than wall-clock rates on a shared
machine)."""

from __future__ import annotations

import os
import subprocess
import time


def tree_rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants (children of every thread), from /proc."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/status") as status:
                total += next((int(line.split()[1]) for line in status
                               if line.startswith("VmRSS:")), 0)
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    todo.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def cpu_seconds_at_exit(worker: subprocess.Popen, timeout: float) -> float:
    """Wait for ``worker`` to exit; the CPU (user + system) its tree used.

    ``wait4``'s usage of a child includes that of the children it reaped
    (a prefork pool's), so it covers the tree. NaN if it did not exit in
    ``timeout`` seconds (it is killed then).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(worker.pid, os.WNOHANG)
        if pid:
            worker.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        time.sleep(0.02)
    worker.kill()
    worker.wait()
    return float("nan")
