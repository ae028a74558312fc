"""Run an ``async def`` body without an event loop, for ``celery worker``.

Task bodies here await only `pause` (and plain code). Under ccworker,
`pause` is ``asyncio.sleep``. Driven by `drive` (the synchronous twin), a
`pause` hands its seconds to the driver, which sleeps with ``time.sleep`` in
the worker's own thread, where Celery's soft time limit (SIGUSR1 in a
prefork child) raises; the driver throws what it caught back into the body at
that same ``await``. So one body is both the ``async def`` task and the
reference Celery runs.
"""

import asyncio
import functools
import inspect
import os
import time

#: Set for ``celery worker``: register the synchronous twins.
SYNC_TWINS = os.environ.get("CC_TEST_SYNC_TWINS") == "1"


class pause:
    """``await pause(seconds)``."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __await__(self):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return (yield self)  # a twin's driver sleeps for us
        return (yield from asyncio.sleep(self.seconds).__await__())


def drive(coro):
    """Run ``coro`` to its end; each `pause` it yields is a ``time.sleep``."""
    value, error = None, None
    while True:
        try:
            step = coro.send(value) if error is None else coro.throw(error)
        except StopIteration as stop:
            return stop.value
        value = error = None
        try:
            time.sleep(step.seconds)
        except BaseException as exc:  # a time limit: into the body, at its await
            error = exc


def twin(fun):
    """``fun`` itself, or its synchronous twin when ``SYNC_TWINS``."""
    if not SYNC_TWINS:
        assert inspect.iscoroutinefunction(fun)
        return fun

    @functools.wraps(fun)
    def synchronous(*args, **kwargs):
        return drive(fun(*args, **kwargs))

    del synchronous.__wrapped__  # Celery must see a plain function
    synchronous.__signature__ = inspect.signature(fun)
    return synchronous
