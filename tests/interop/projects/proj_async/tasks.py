"""``async def`` tasks (each registered as its synchronous twin for Celery, see twins.py)."""

import asyncio
import os
import threading
import time

import redis
from celery import Task, shared_task
from celery.exceptions import SoftTimeLimitExceeded

from ccit_recorder import record
from celerycompat import aio

from .celery import app
from .twins import pause, twin


@app.task
def noop():
    """The harness's probe: a synchronous task beside the async ones."""
    return "done"


@app.task
@twin
async def add(x, y):
    await pause(0.01)
    return x + y


@app.task
async def cancelled_by_itself():
    """A cancellation nobody asked for: the coroutine awaits a task that was
    cancelled (``asyncio.gather`` of a cancelled child raises the same)."""
    child = asyncio.ensure_future(asyncio.sleep(10))
    child.cancel()
    await child


@app.task
async def calls_others(x):
    """Calls another async task directly, as its ``async def`` function is
    called: ``await add(...)`` and ``await add.run(...)`` (ccworker only: a
    synchronous twin's direct call returns a value, not an awaitable)."""
    return [await add(x, 1), await add.run(x, 2)]


@app.task(acks_late=True)
@twin
async def late_add(x, y):
    await pause(0.01)
    return x + y


@app.task(rate_limit="20/s")
@twin
async def rated(n):
    await pause(0.01)
    return n


@app.task
@twin
async def fail(message):
    await pause(0.01)
    raise ValueError(message)


@app.task(bind=True)
@twin
async def request_fields(self):
    await pause(0.01)
    return {"id": self.request.id, "retries": self.request.retries,
            "delivery_info": sorted(self.request.delivery_info or {}),
            "is_eager": self.request.is_eager}


@app.task(bind=True, max_retries=2, default_retry_delay=0.1)
@twin
async def retried(self, succeed_at):
    await pause(0.01)
    if self.request.retries < succeed_at:
        raise self.retry()
    return f"ran {self.request.retries + 1} times"


@app.task(bind=True, autoretry_for=(KeyError,), retry_kwargs={"max_retries": 2,
                                                              "countdown": 0.1})
@twin
async def autoretried(self, succeed_at):
    await pause(0.01)
    if self.request.retries < succeed_at:
        raise KeyError(f"attempt {self.request.retries}")
    return f"ran {self.request.retries + 1} times"


@shared_task
@twin
async def shared(word):
    await pause(0.01)
    return word.upper()


class Hooked(Task):
    def on_success(self, retval, task_id, args, kwargs):
        record("on_success", name=self.name, id=task_id, retval=retval)


@app.task(base=Hooked)
@twin
async def hooked(n):
    await pause(0.01)
    return n + 1


@app.task(soft_time_limit=0.5)
@twin
async def soft_limited():
    await pause(5)
    return "not limited"


@app.task(soft_time_limit=0.5)
@twin
async def soft_caught():
    try:
        await pause(5)
    except SoftTimeLimitExceeded as exc:
        await pause(0.01)
        return f"cleaned up after {exc!r}"
    return "not limited"


@app.task(bind=True, time_limit=0.5)
@twin
async def hard_limited(self):
    try:
        await pause(5)
    finally:
        record("hard_limited_finally", id=self.request.id)


@app.task
@twin
async def total(numbers):
    await pause(0.01)
    return sum(numbers)


# -- not recorded by signals.py: as proj_pool's, for test_terminate's scenario --


@app.task(bind=True)
@twin
async def sleep(self, seconds):
    record("started", id=self.request.id)
    try:
        await pause(seconds)
    finally:
        record("finally", id=self.request.id)
    return seconds


@app.task
@twin
async def gated(gate, limit=60.0):
    """Awaits until the test opens ``gate`` (RPUSHes to it): running for as
    long as a loaded machine needs to look at it. True if it was opened."""
    client = redis.Redis.from_url(os.environ["CC_TEST_RECORD_URL"])
    try:
        for _ in range(int(limit / 0.05)):
            if client.llen(gate):
                return True
            await pause(0.05)
        return False
    finally:
        client.close()


@app.task
@twin
async def barrier(key, n, timeout=20.0):
    """True once ``n`` tasks are in here at the same time (slots serving)."""
    client = redis.Redis.from_url(os.environ["CC_TEST_RECORD_URL"])
    try:
        client.incr(key)
        client.expire(key, 120)
        for _ in range(int(timeout / 0.05)):
            if int(client.get(key) or 0) >= n:
                return True
            await pause(0.05)
        return False
    finally:
        client.close()


# -- ccworker only: the loop itself --------------------------------------------


LOOP_STARTS = []


@aio.on_loop_start
async def count_loop_starts(loop):
    LOOP_STARTS.append(id(loop))


@app.task
async def loop_identity():
    """Which process and loop ran this, and how many loops this process began."""
    await asyncio.sleep(0)
    return [os.getpid(), id(asyncio.get_running_loop()), len(LOOP_STARTS)]


@app.task
def sync_thread():
    """A synchronous task under -P asyncio: the thread it runs on (never the loop's)."""
    return threading.current_thread().name


@app.task
async def block_loop(seconds):
    """Blocks its event loop (a synchronous sleep in a coroutine)."""
    time.sleep(seconds)
    return "blocked"
