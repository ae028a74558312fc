"""``async def`` tasks made plain calls (celerycompat.execution.coroutines).

The pools' interruptions (soft limit, hard limit, terminate) arrive through
``deliver`` from another thread or a signal handler; these tests deliver them
the same way, from a timer thread, and check where the coroutine sees them.
"""

from __future__ import annotations

import asyncio
import threading
import uuid

import pytest
from billiard.exceptions import SoftTimeLimitExceeded
from celery import Celery
from celery.exceptions import Retry

from celerycompat.execution import coroutines


class Unwind(BaseException):
    """Stands for the pools' RunUnwind exceptions."""


@pytest.fixture
def app():
    app = Celery(f"t{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://",
                 set_as_current=False)
    return app


def later(delay: float, fn, *args, **kwargs) -> threading.Timer:
    timer = threading.Timer(delay, fn, args, kwargs)
    timer.start()
    return timer


def test_an_async_task_is_awaited_and_keeps_its_loop(app):
    loops = []

    @app.task(name="t.double", shared=False)
    async def double(n):
        await asyncio.sleep(0)
        loops.append(asyncio.get_running_loop())
        return n * 2

    @app.task(name="t.plain", shared=False)
    def plain(n):
        return n

    # Only this app's own tasks: a ``shared_task`` some other module of the
    # same pytest process imported (proj_async's) joins every app finalized.
    assert [n for n in coroutines.adapt_all(app) if n.startswith("t.")] == ["t.double"]
    assert [n for n in coroutines.async_task_names(app) if n.startswith("t.")] == ["t.double"]
    assert double.run(2) == 4 and double(3) == 6
    assert loops[0] is loops[1] and not loops[0].is_closed()
    assert coroutines.adapt(double) is True  # idempotent
    assert plain.run(1) == 1
    coroutines.close_thread_loop()
    assert loops[0].is_closed()


def test_bind_request_and_retry_from_inside_the_coroutine(app):
    @app.task(name="t.bound", bind=True, shared=False)
    async def bound(self, n):
        await asyncio.sleep(0)
        if n < 0:
            raise self.retry(countdown=1, max_retries=3)
        return self.request.id

    coroutines.adapt(bound)
    bound.push_request(id="the-id", retries=0)
    try:
        assert bound.run(1) == "the-id"
        with pytest.raises(Retry):
            bound.run(-1)
    finally:
        bound.pop_request()
        coroutines.close_thread_loop()


def test_autoretry_wrapper_sees_the_coroutines_exception(app):
    attempts = []

    @app.task(name="t.flaky", autoretry_for=(KeyError,), retry_kwargs={"max_retries": 2},
              shared=False)
    async def flaky():
        attempts.append(1)
        raise KeyError("x")

    coroutines.adapt(flaky)
    assert getattr(flaky._orig_run, coroutines.ADAPTED) is not None
    flaky.push_request(id="i", retries=0, called_directly=False)
    try:
        with pytest.raises(Retry):
            flaky.run()
    finally:
        flaky.pop_request()
        coroutines.close_thread_loop()
    assert attempts == [1]


def test_a_soft_limit_is_raised_at_the_await_and_can_be_caught(app):
    @app.task(name="t.soft", shared=False)
    async def soft():
        try:
            await asyncio.sleep(5)
        except SoftTimeLimitExceeded:
            await asyncio.sleep(0)  # the task goes on, its loop intact
            return "caught"
        return "not interrupted"

    coroutines.adapt(soft)
    ident = threading.get_ident()
    later(0.1, coroutines.deliver, ident, SoftTimeLimitExceeded, cancel=False)
    try:
        assert soft.run() == "caught"
    finally:
        coroutines.close_thread_loop()


def test_an_uncaught_soft_limit_fails_the_run(app):
    @app.task(name="t.soft2", shared=False)
    async def soft():
        await asyncio.sleep(5)

    coroutines.adapt(soft)
    later(0.1, coroutines.deliver, threading.get_ident(), SoftTimeLimitExceeded, cancel=False)
    try:
        with pytest.raises(SoftTimeLimitExceeded):
            soft.run()
    finally:
        coroutines.close_thread_loop()


def test_a_hard_limit_cancels_the_coroutine_and_unwinds(app):
    cleaned = []

    @app.task(name="t.hard", shared=False)
    async def hard():
        try:
            await asyncio.sleep(5)
        finally:
            cleaned.append("finally")

    coroutines.adapt(hard)
    later(0.1, coroutines.deliver, threading.get_ident(), Unwind, cancel=True)
    try:
        with pytest.raises(Unwind):
            hard.run()
        assert cleaned == ["finally"]
        # The loop serves the next run.
        assert coroutines.run(asyncio.sleep(0, result="next")) == "next"
    finally:
        coroutines.close_thread_loop()


def test_deliver_to_a_thread_without_a_coroutine_is_declined():
    assert coroutines.deliver(threading.get_ident(), SoftTimeLimitExceeded,
                              cancel=False) is False


def test_loop_hooks_run_once_per_loop():
    seen = []

    async def start(loop):
        seen.append(("start", loop))

    async def stop(loop):
        seen.append(("stop", loop))

    coroutines.on_loop_start(start)
    coroutines.on_loop_stop(stop)
    try:
        coroutines.run(asyncio.sleep(0))
        coroutines.run(asyncio.sleep(0))
        coroutines.close_thread_loop()
    finally:
        coroutines._start_hooks.remove(start)
        coroutines._stop_hooks.remove(stop)
    assert [kind for kind, _ in seen] == ["start", "stop"]
    assert seen[0][1] is seen[1][1]


def test_each_thread_has_its_own_loop():
    loops = []

    def in_thread():
        loops.append(coroutines.run(_running_loop()))
        coroutines.close_thread_loop()

    threads = [threading.Thread(target=in_thread) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loops) == 2 and loops[0] is not loops[1]


async def _running_loop():
    return asyncio.get_running_loop()


def test_an_async_task_called_directly_inside_another_gives_its_coroutine(app):
    """``await other(x)`` and ``await other.run(x)`` inside an async task, as
    with the ``async def`` functions themselves; outside a coroutine the call
    is awaited to its end. (Before: the nested call tried to run the
    thread's loop, already running, and failed.)"""

    @app.task(name="t.inner", shared=False)
    async def inner(n):
        await asyncio.sleep(0)
        return n + 1

    @app.task(name="t.outer", shared=False)
    async def outer(n):
        return [await inner(n), await inner.run(n + 10)]

    coroutines.adapt_all(app)
    try:
        assert outer.run(1) == [2, 12]
        assert outer(5) == [6, 16]
        assert inner(1) == 2  # not inside a coroutine: awaited here
    finally:
        coroutines.close_thread_loop()
