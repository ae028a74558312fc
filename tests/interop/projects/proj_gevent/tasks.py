"""Tasks that exercise the gevent pool.

``sleep`` and ``gated`` wait cooperatively (``time.sleep`` is gevent's once
the worker patched the process), so hundreds of them run at once on one
thread; ``gated`` until the test opens its gate, so the test decides when
they may finish.
``spin`` computes and ``block`` sleeps with the *original* ``time.sleep``:
both keep the event loop from running anything else, which is what the
watchdog must notice. The limited tasks mirror ``proj_prefork``'s.
"""

import os
import time

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from ccit_recorder import record

from .celery import app

_redis = None


def _client():
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["CC_TEST_RECORD_URL"])
    return _redis


_gate = None


def _gate_client():
    """A client whose pool makes greenlets wait for a connection (at most 20),
    so hundreds of gated tasks never exceed it."""
    global _gate
    if _gate is None:
        _gate = redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
            os.environ["CC_TEST_RECORD_URL"], max_connections=20, timeout=None))
    return _gate


def _first_time(key):
    return key is None or _client().incr(f"ccit.once.{key}") == 1


def _original_sleep():
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent comes with the test extras
        return time.sleep
    return monkey.get_original("time", "sleep")


@app.task
def noop():
    return "done"


@app.task
def add(x, y):
    return x + y


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def gated(key):
    """Waits, cooperatively, until the test opens the gate (creates ``key``)."""
    client = _gate_client()
    while not client.exists(key):
        time.sleep(0.1)
    return "opened"


@app.task
def spin(seconds):
    """CPU-bound: never yields to the event loop for ``seconds``."""
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1
    return "spun"


@app.task
def block(seconds):
    """A blocking call gevent does not patch."""
    _original_sleep()(seconds)
    return "blocked"


class RecordingTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo):
        record("on_failure", name=self.name, id=task_id,
               exc=f"{type(exc).__name__}{exc.args!r}")

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        if isinstance(retval, BaseException):
            retval = f"{type(retval).__name__}{retval.args!r}"
        record("after_return", name=self.name, id=task_id, status=status, retval=retval)


@app.task(base=RecordingTask, time_limit=1)
def hard_limited(seconds=30):
    time.sleep(seconds)
    return "finished"


@app.task(base=RecordingTask)
def limited_by_message(seconds=30):
    time.sleep(seconds)
    return "finished"


@app.task(time_limit=1, acks_late=True, acks_on_failure_or_timeout=False)
def hard_limited_late(once):
    if _first_time(once):
        time.sleep(30)
    return "second run"


@app.task(soft_time_limit=1)
def soft_limited(seconds=30):
    time.sleep(seconds)
    return "finished"


@app.task(soft_time_limit=1, time_limit=3)
def soft_caught(seconds=30):
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded as exc:
        return f"cleaned up after {exc!r}"
    return "finished"


@app.task(time_limit=1)
def swallow_kill(seconds=3):
    """Catches everything, the greenlet kill included, and goes on."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            time.sleep(0.1)
        except BaseException:  # noqa: BLE001 - exactly what a task should not do
            pass
    record("swallow_kill_finished")
    return "swallowed"
