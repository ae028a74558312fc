"""The memory of a worker's whole process tree, as the benchmarks report it."""

from __future__ import annotations

import os


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
