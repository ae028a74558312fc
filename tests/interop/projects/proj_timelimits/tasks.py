"""Tasks that run into their time limits.

Most of them wait in short naps (`nap`): a task busy in Python code, which
every pool can interrupt. ``blocking`` waits in one long ``time.sleep``, a C
call: the prefork pool (signals to the child) and the solo pool (SIGALRM)
interrupt it; the threads pool can only raise in the thread once the call
returns (CPython's limit), so there the test sees the soft limit late and
the hard limit's FAILURE on time while the thread sleeps on.

Every nap leaves ``ccit.unwound.<task id>`` in Redis when its task is
unwound (its ``finally`` ran), so a test can wait for an abandoned thread
to be done before it checks that nothing it did afterwards counts.
"""

import os
import time

import redis
from celery import Task, current_task
from celery.exceptions import SoftTimeLimitExceeded

from ccit_recorder import record

from .celery import app

_redis = None


def _client():
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["CC_TEST_RECORD_URL"])
    return _redis


def _first_time(key):
    return key is None or _client().incr(f"ccit.once.{key}") == 1


def _mark_unwound():
    task_id = current_task.request.id
    if task_id and os.environ.get("CC_TEST_RECORD_URL"):
        _client().set(f"ccit.unwound.{task_id}", 1, ex=300)


def nap(seconds):
    """Wait ``seconds`` in Python code (short sleeps)."""
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.02)
    finally:
        _mark_unwound()


class RecordingTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo):
        record("on_failure", name=self.name, id=task_id,
               exc=f"{type(exc).__name__}{exc.args!r}")

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        if isinstance(retval, BaseException):
            retval = f"{type(retval).__name__}{retval.args!r}"
        record("after_return", name=self.name, id=task_id, status=status, retval=retval)


@app.task
def noop():
    return "done"


@app.task
def add(x, y):
    return x + y


@app.task
def meet(key, n, timeout=30):
    """True once ``n`` of these run at the same time (all slots in use)."""
    client = _client()
    client.incr(key)
    client.expire(key, 300)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if int(client.get(key) or 0) >= n:
            return True
        time.sleep(0.02)
    return False


@app.task(base=RecordingTask, time_limit=1)
def hard_limited(seconds=30):
    nap(seconds)
    return "finished"


@app.task(base=RecordingTask)
def limited_by_message(seconds=30):
    nap(seconds)
    return "finished"


@app.task(base=RecordingTask)
def blocking(seconds):
    try:
        time.sleep(seconds)
    finally:
        _mark_unwound()
    return "finished"


@app.task(base=RecordingTask, soft_time_limit=1)
def soft_limited(seconds=30):
    nap(seconds)
    return "finished"


@app.task(base=RecordingTask, soft_time_limit=1, time_limit=3)
def soft_caught(seconds=30):
    try:
        nap(seconds)
    except SoftTimeLimitExceeded as exc:
        return f"cleaned up after {exc!r}"
    return "finished"


@app.task(base=RecordingTask)
def persistent(seconds=30):
    """Catches the soft limit and goes on, into the hard one."""
    try:
        nap(seconds)
    except SoftTimeLimitExceeded:
        record("caught soft", id=current_task.request.id)
    nap(seconds)
    return "finished"


@app.task(base=RecordingTask)
def control_limited(seconds=30):
    """Limited only by ``celery control time_limit`` (the scenario resets it)."""
    return persistent.run(seconds)


@app.task(base=RecordingTask, time_limit=1, acks_late=True,
          acks_on_failure_or_timeout=False)
def hard_limited_late(once):
    if _first_time(once):
        nap(30)
    return "second run"
