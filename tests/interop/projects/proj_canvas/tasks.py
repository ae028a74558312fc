"""Tasks of ``proj_canvas``: each makes one task-semantics behaviour visible."""

import os

import celery
import redis
from celery.exceptions import Reject

from ccit_recorder import record

from .celery import SIDE, app

_store = redis.Redis.from_url(os.environ.get("CC_TEST_RECORD_URL", "redis://127.0.0.1:6379/11"))


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(values):
    return sum(values)


@app.task
def fail(why):
    raise ValueError(why)


@app.task(bind=True)
def who(self, x):
    """``x``, noting which worker ran it (mixed-cluster chords)."""
    _store.rpush(f"ccit.who.{self.request.group}", self.request.hostname)
    return x


@app.task(bind=True)
def retry_to_side(self, x, y=0):
    """Retry once into ``<queue>.side`` with routing options, where nobody consumes.

    (Celery before 5.7 refuses to retry with ``kwargs={"x": x}`` beside the
    request's own positional ``x``: its argument check fails the retry.)"""
    raise self.retry(countdown=30, queue=SIDE, priority=3, headers={"extra": "h"},
                     args=(x,), kwargs={"y": 1})


#: Celery 5.2 takes ``int(retry_backoff)`` (0.1 -> 0: no backoff, so the task's
#: 180 s default delay); from 5.3 a float factor is kept. 1 s retries there.
_OLD_BACKOFF = tuple(int(p) for p in celery.__version__.split(".")[:2]) < (5, 3)


@app.task(bind=True, autoretry_for=(KeyError,), retry_backoff=1 if _OLD_BACKOFF else 0.1,
          retry_jitter=False, retry_backoff_max=1 if _OLD_BACKOFF else 0.3, max_retries=3)
def backoff(self, succeed_at):
    record("run", id=self.request.id, retries=self.request.retries)
    if self.request.retries < succeed_at:
        raise KeyError("missing", self.request.retries)
    return {"retries": self.request.retries}


@app.task(bind=True, max_retries=0)
def no_retries_left(self):
    """``max_retries=0``: the first retry raises MaxRetriesExceededError."""
    raise self.retry(countdown=0.1)


@app.task(bind=True)
def retry_no_throw(self):
    """``throw=False``: the task goes on after scheduling its retry."""
    record("run", id=self.request.id, retries=self.request.retries)
    if self.request.retries == 0:
        self.retry(countdown=0.1, throw=False)
        return "after retry"
    return "retried"


@app.task(bind=True, acks_late=True)
def reject_requeue_once(self, key):
    """``Reject(requeue=True)`` the first time: the message goes back and runs again."""
    if _store.incr(f"ccit.requeue.{key}") == 1:
        raise Reject("again", requeue=True)
    return "second run"


@app.task(bind=True)
def replaced(self, x):
    """``self.replace``: the result is the replacement's."""
    raise self.replace(add.s(x, 100))


@app.task(bind=True)
def replaced_by_group(self, n):
    from celery import group

    raise self.replace(group(add.s(i, i) for i in range(n)))


@app.task
def noop():
    """The harness's sentinel."""


@app.task
def tsum_once(values, key):
    """A chord body that counts its own runs under ``key``."""
    _store.incr(f"ccit.body.{key}")
    return sum(values)


@app.task(bind=True)
def slow_who(self, x):
    """``who``, taking a little while, so that header tasks spread over workers."""
    import time

    time.sleep(0.05)
    _store.rpush(f"ccit.who.{self.request.group}", self.request.hostname)
    return x
