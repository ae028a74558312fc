"""``-D/--detach``: the command line the detached worker runs (the process
side is tests/interop/test_detach.py, beside ``celery worker -D``)."""

from __future__ import annotations

import pytest

from celerycompat.daemon import detached_argv


@pytest.mark.parametrize("argv, expected", [
    (["-A", "proj", "-D", "-l", "INFO"], ["-A", "proj", "-l", "INFO"]),
    (["-A", "proj", "--detach", "--pidfile", "/run/w.pid"],
     ["-A", "proj", "--pidfile", "/run/w.pid"]),
    # --uid/--gid are applied while detaching: gone with their values (Celery
    # leaves the values behind as stray arguments).
    (["-A", "p", "-D", "--uid", "1000", "--gid", "1000", "-c", "2"], ["-A", "p", "-c", "2"]),
    (["-A", "p", "-D", "--uid=1000", "--gid=web"], ["-A", "p"]),
    # Trailing settings pass unchanged, and nothing after "--" is a flag.
    (["-A", "p", "-D", "--", "-D", "worker_x=1"], ["-A", "p", "--", "-D", "worker_x=1"]),
    (["-A", "p", "worker", "-D", "task_acks_late=1"], ["-A", "p", "worker", "task_acks_late=1"]),
])
def test_detached_argv(argv, expected):
    assert detached_argv(argv) == expected
