"""Tasks of ``proj_pool``.

``sleep``/``busy`` record that their body started (so a test knows a task is
running before it terminates it) and whether their ``finally`` block ran.
``barrier(key, n)`` returns True only if ``n`` tasks were running at the
same time (each waits, up to ``timeout``, until ``n`` have arrived): how a
test sees how many slots a worker really has. ``module_value(name)``
returns ``VALUE`` of a module the ``pool_restart`` test rewrites.
"""

import importlib
import os
import time

import redis

from ccit_recorder import record

from .celery import app

_redis = None


def _client():
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["CC_TEST_RECORD_URL"])
    return _redis


@app.task
def noop():
    return "done"


@app.task
def add(x, y):
    return x + y


@app.task(bind=True)
def sleep(self, seconds):
    record("started", id=self.request.id)
    try:
        time.sleep(seconds)
    finally:
        record("finally", id=self.request.id)
    return seconds


@app.task(bind=True, acks_late=True)
def sleep_late(self, seconds):
    record("started", id=self.request.id)
    try:
        time.sleep(seconds)
    finally:
        record("finally", id=self.request.id)
    return seconds


@app.task(bind=True)
def busy(self, seconds):
    """Runs Python bytecode (no blocking call) for ``seconds``."""
    record("started", id=self.request.id)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
    finally:
        record("finally", id=self.request.id)
    return seconds


@app.task
def barrier(key, n, timeout=20.0):
    client = _client()
    client.incr(key)
    client.expire(key, 120)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(client.get(key) or 0) >= n:
            return True
        time.sleep(0.05)
    return False


@app.task
def pid():
    return os.getpid()


@app.task
def module_value(name):
    return importlib.import_module(name).VALUE
