"""Tasks for operating a worker: where it ran, a slow one, an execution counter."""

import os
import time

from ccit_recorder import _redis, record

from .celery import app


def _count_run(task_id):
    """INCR a per-message counter next to the record list (exactly-once checks)."""
    key = os.environ.get("CC_TEST_RECORD")
    if key and os.environ.get("CC_TEST_RECORD_URL"):
        _redis().hincrby(key + ".runs", task_id, 1)


@app.task
def add(x, y):
    return x + y


@app.task
def shout(text):
    """Print ``text`` (the worker redirects task output into its log); the pid."""
    print(text)
    return os.getpid()


@app.task
def noop():
    """A sentinel: once its result exists, earlier messages were handled."""
    return "done"


@app.task(bind=True)
def where(self):
    """Which node ran the message and from which queue it came."""
    info = self.request.delivery_info or {}
    return {"hostname": self.request.hostname, "routing_key": info.get("routing_key")}


@app.task(bind=True)
def sleeper(self, seconds):
    """Record the start (so a test can signal the worker mid-task), sleep, return."""
    _count_run(self.request.id)
    record("started", id=self.request.id)
    time.sleep(seconds)
    record("finished", id=self.request.id)
    return seconds


@app.task(bind=True)
def counted(self, n):
    _count_run(self.request.id)
    return n


@app.task
def size_of(value):
    return len(value)
