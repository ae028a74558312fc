"""``-P asyncio``: ``async def`` tasks as coroutines of one event loop per worker process.

::

    consumer thread                    loop thread (asyncio, runs for ever)
    ---------------                    -------------------------------------------
    apply(async task) --threadsafe-->  asyncio Task "drive" <-> task greenlet:
                                         TaskRunner.run (signals, results) runs in
                                         the greenlet; at the task body's awaits the
                                         greenlet hands each step to the driver,
                                         which awaits it: nothing blocks, the loop
                                         runs -c such tasks at once
    apply(sync task) ----------------> ThreadPool (bounded): never on the loop

Celery's tracing is synchronous from end to end (signals, result writes,
the tracer wrappers monitoring libraries install), and the body sits in the
middle of it. Each run therefore gets a greenlet on the loop thread: the
synchronous parts run in it as written, and the body's coroutine is stepped
*inside* it (``self.request``, ``current_task`` and Celery's other
greenlet-keyed state are the run's), while the loop's own asyncio Task,
the driver, waits for what each step yields. Only a run's synchronous parts
hold the loop: a signal receiver or result write that blocks, blocks every
task (the watchdog names it, as under gevent); SUCCESS writes are grouped and
written by the group-commit thread.

It is the green pool (green.py: slots counted by the consumer, time limits
as loop timers, kill, terminate, hard-limit outcomes, the watchdog) with
asyncio in gevent's place. A kill is carried by the driver: a soft limit
throws ``SoftTimeLimitExceeded`` into the coroutine at its await; a hard
limit, terminate or cold stop cancels the coroutine (``CancelledError`` at
its await, its ``finally`` runs), and the run then unwinds with the pool's
``TaskKilled``.

The loop lives as long as the process; `coroutines.on_loop_start` hooks run
on it before the first task, `on_loop_stop` hooks when the pool stops.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from types import FrameType
from typing import Any, Callable, Generator, Iterator

import greenlet
from greenlet import GreenletExit

from celerycompat.execution import coroutines
from celerycompat.execution.coroutines import withdraw_cancellation
from celerycompat.pools.green import GreenPool
from celerycompat.pools.hub_watchdog import HubWatchdog
from celerycompat.pools.threads import ThreadPool
from celerycompat.protocol.message import TaskMessage

logger = logging.getLogger("celerycompat.pools.asyncio")

#: Threads for synchronous tasks unless ``worker_asyncio_sync_threads`` says.
DEFAULT_SYNC_THREADS = 8


class Completion:
    """Set once, waited for from any thread: a ``threading.Event`` made only
    when someone waits before it is set (one per task would cost more than
    the rest of the hand-off)."""

    __slots__ = ("done", "_event")
    _making = threading.Lock()

    def __init__(self) -> None:
        self.done = False
        self._event: threading.Event | None = None

    def set(self) -> None:
        self.done = True
        event = self._event
        if event is not None:
            event.set()

    def is_set(self) -> bool:
        return self.done

    def wait(self, timeout: float | None = None) -> bool:
        if self.done:
            return True
        with self._making:
            if self._event is None:
                self._event = threading.Event()
        if self.done:  # set before the event existed
            return True
        return self._event.wait(timeout)


class GreenTask:
    """A function run in a greenlet of the loop thread, driven by an asyncio Task.

    Made on any thread; its greenlet and Task are made on the loop thread.
    """

    __slots__ = ("function", "args", "greenlet", "task", "finished", "interrupt", "killed",
                 "__weakref__")

    def __init__(self, function: Callable[..., Any], args: tuple) -> None:
        self.function = function
        self.args = args
        self.greenlet: TaskGreenlet | None = None
        self.task: asyncio.Task | None = None
        self.finished = Completion()
        #: The exception a kill carries to the coroutine, until the driver takes it.
        self.interrupt: BaseException | type[BaseException] | None = None
        #: Killed with a GreenletExit: the run leaves with it once the coroutine ends.
        self.killed: BaseException | type[BaseException] | None = None


class TaskGreenlet(greenlet.greenlet):
    """The greenlet of one `GreenTask`; `coroutines.run` awaits through it."""

    def __init__(self, handle: GreenTask, runtime: AsyncioRuntime) -> None:
        super().__init__(self._main, runtime.main_greenlet)
        self.handle = handle
        self.runtime = runtime

    def _main(self) -> Any:
        return self.handle.function(*self.handle.args)

    def wait_for(self, write: Any) -> None:
        """Until ``write`` (a group-commit `Write`, finished on the writer's
        thread) is done, with the loop running the other tasks meanwhile."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        write.add_done_callback(lambda _: self.runtime.call(_resolve, future))
        self.await_coroutine(_awaited(future))

    def await_coroutine(self, coro: Any) -> Any:
        """Run ``coro`` to its end, each step here, each wait in the driver."""
        steps = coro.__await__()
        value: Any = None
        error: BaseException | None = None
        while True:
            inside = coroutines.in_coroutine.set(True)  # for the step only
            try:
                step = steps.send(value) if error is None else steps.throw(error)
            except StopIteration as stop:
                return stop.value
            except asyncio.CancelledError as cancelled:
                killed = self.handle.killed
                if killed is not None:
                    raise (killed if isinstance(killed, BaseException) else killed()) from None
                raise coroutines.cancelled_unasked(cancelled) from None
            finally:
                coroutines.in_coroutine.reset(inside)
            value = error = None
            kind, payload = self.parent.switch(step)
            if kind == "send":
                value = payload
            else:
                error = payload


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _drive(handle: GreenTask) -> Generator[Any, Any, Any]:
    """The driver's body (an asyncio Task awaits it): switch into the greenlet,
    await what it yields, and carry kills in as exceptions at that await."""
    glet = handle.greenlet
    assert glet is not None
    out = glet.switch()
    while not glet.dead:
        try:
            message: tuple = ("send", (yield out))
        except asyncio.CancelledError as cancelled:
            interrupt, handle.interrupt = handle.interrupt, None
            if interrupt is None or handle.killed is not None:
                message = ("throw", cancelled)  # a kill: the coroutine is cancelled
            else:
                withdraw_cancellation()  # it stood for the soft limit
                message = ("throw", interrupt if isinstance(interrupt, BaseException)
                           else interrupt())
        except BaseException as exc:
            message = ("throw", exc)
        out = glet.switch(message)
    return out


class _Driven:
    __slots__ = ("handle",)

    def __init__(self, handle: GreenTask) -> None:
        self.handle = handle

    def __await__(self) -> Generator[Any, Any, Any]:
        return _drive(self.handle)


class AsyncioRuntime:
    """`green.GreenRuntime` on an asyncio loop in a thread of its own."""

    pool_name = "celerycompat.pools.asyncio_pool:AsyncioPool"
    logger = logger

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ident = 0
        self.main_greenlet: greenlet.greenlet | None = None
        #: Calls from other threads, run on the loop in order; one wake-up of
        #: the loop for as many as arrive before it runs them (`call`).
        self._inbox: deque = deque()
        self._woken = False
        self._tracked: set[GreenTask] = set()
        self._lock = threading.Lock()

    # -- the loop thread -------------------------------------------------------------

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(ready,),
                                        name="ccworker-asyncio", daemon=True)
        self._thread.start()
        ready.wait()
        # The project's loop hooks, before the first task.
        asyncio.run_coroutine_threadsafe(self._hooks(coroutines.start_hooks()),
                                         self.loop).result()

    def _run_loop(self, ready: threading.Event) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._ident = threading.get_ident()
        self.main_greenlet = greenlet.getcurrent()
        self.loop.call_soon(ready.set)
        try:
            self.loop.run_forever()
        finally:
            try:
                self.loop.run_until_complete(self._hooks(coroutines.stop_hooks()))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            except Exception:
                logger.exception("Closing the asyncio pool's loop failed")
            self.loop.close()

    async def _hooks(self, hooks: list) -> None:
        for hook in hooks:
            try:
                await hook(self.loop)
            except Exception:
                logger.exception("A loop hook failed: %r", hook)

    def close(self) -> None:
        """Stop the loop (its stop hooks run) and wait for its thread."""
        if self.loop is not None and self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def on_loop(self) -> bool:
        return threading.get_ident() == self._ident

    # -- green threads ------------------------------------------------------------------

    def spawn_task(self, run: Callable[[Any], None], job: Any) -> GreenTask:
        handle = GreenTask(run, (job,))
        with self._lock:
            self._tracked.add(handle)
        self.call(self._launch, handle)
        return handle

    def spawn(self, function: Callable[..., Any], *args: Any) -> GreenTask:
        handle = GreenTask(function, args)
        self.call(self._launch, handle)
        return handle

    def call(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` on the loop soon, from any thread."""
        assert self.loop is not None, "start() first"
        if self.on_loop():
            self.loop.call_soon(function, *args)
            return
        self._inbox.append((function, args))
        if not self._woken:
            self._woken = True
            try:
                self.loop.call_soon_threadsafe(self._run_inbox)
            except RuntimeError:  # the loop is closed: the worker is stopping
                pass

    def _run_inbox(self) -> None:
        # Cleared first: a call appended from now on wakes the loop again.
        self._woken = False
        inbox = self._inbox
        while inbox:
            function, args = inbox.popleft()
            try:
                function(*args)
            except Exception:
                logger.exception("An asyncio pool call failed: %r", function)

    def _launch(self, handle: GreenTask) -> None:
        if handle.killed is not None:  # killed before it began: it never runs
            self._finished(handle)
            return
        assert self.main_greenlet is not None
        handle.greenlet = TaskGreenlet(handle, self)
        handle.task = self.loop.create_task(self._run(handle))

    async def _run(self, handle: GreenTask) -> None:
        try:
            await _Driven(handle)
        except GreenletExit:
            pass
        except BaseException:
            logger.exception("An asyncio pool greenlet failed")
        finally:
            self._finished(handle)

    def _finished(self, handle: GreenTask) -> None:
        with self._lock:
            self._tracked.discard(handle)
        handle.finished.set()

    def current(self) -> GreenTask | None:
        return getattr(greenlet.getcurrent(), "handle", None)

    def kill(self, handle: GreenTask, exc: Any) -> None:
        self.call(self._kill, handle, exc)

    def _kill(self, handle: GreenTask, exc: Any) -> None:
        if handle.finished.is_set():
            return
        cancels = isinstance(exc, GreenletExit) or (
            isinstance(exc, type) and issubclass(exc, GreenletExit))
        if cancels:
            handle.killed = exc
        if handle.task is None:
            if cancels:
                return  # `_launch` finds it killed
            handle.interrupt = exc
            return
        handle.interrupt = exc
        handle.task.cancel()

    def dead(self, handle: GreenTask) -> bool:
        return handle.finished.is_set()

    def join(self, handle: GreenTask, timeout: float) -> None:
        if self.on_loop() and isinstance(greenlet.getcurrent(), TaskGreenlet):
            waited = asyncio.get_running_loop().run_in_executor(None, handle.finished.wait,
                                                                timeout)
            greenlet.getcurrent().await_coroutine(_awaited(waited))
        else:
            handle.finished.wait(timeout)

    def forget(self, handle: GreenTask) -> None:
        with self._lock:
            self._tracked.discard(handle)

    def join_all(self) -> None:
        while True:
            with self._lock:
                pending = list(self._tracked)
            if not pending:
                return
            for handle in pending:
                handle.finished.wait()

    def kill_all(self, exc: Any, timeout: float) -> None:
        with self._lock:
            pending = list(self._tracked)
        for handle in pending:
            self.kill(handle, exc)
        deadline = time.monotonic() + timeout
        for handle in pending:
            handle.finished.wait(max(0.0, deadline - time.monotonic()))

    def call_later(self, seconds: float, function: Callable[..., Any], *args: Any
                   ) -> Callable[[], None]:
        assert self.loop is not None
        if self.on_loop():
            timer = self.loop.call_later(seconds, function, *args)
        else:
            timer = asyncio.run_coroutine_threadsafe(
                _call_later(seconds, function, args), self.loop).result()

        def cancel() -> None:
            if self.on_loop():
                timer.cancel()
            elif self.loop is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(timer.cancel)

        return cancel

    def repeat(self, interval: float, function: Callable[[], None]) -> Callable[[], None]:
        stopped = threading.Event()

        def tick() -> None:
            if not stopped.is_set():
                function()
                self.loop.call_later(interval, tick)

        self.call(tick)
        return stopped.set

    def watchdog(self, describe: Callable[[FrameType], str | None],
                 threshold: float) -> HubWatchdog:
        return HubWatchdog(
            describe, threshold, repeat=self.repeat,
            start_thread=lambda function: threading.Thread(
                target=function, name="ccworker-asyncio-watchdog", daemon=True).start(),
            sleep=time.sleep, main_ident=self._ident, loop="asyncio event loop",
            logger=logger)


async def _awaited(future: Any) -> Any:
    return await future


async def _call_later(seconds: float, function: Callable[..., Any], args: tuple) -> Any:
    return asyncio.get_running_loop().call_later(seconds, function, *args)


class AsyncioPool(GreenPool):
    """``-P asyncio``: async tasks on the loop (``limit`` at once), sync ones on threads."""

    task_join_will_block = True

    def __init__(self, runner: Any, limit: int, *, sync_threads: int | None = None,
                 **options: Any) -> None:
        self.runtime = AsyncioRuntime()
        super().__init__(self.runtime, runner, limit, **options)
        self.sync = ThreadPool(runner, max(1, min(int(limit) or 1,
                                                  sync_threads or DEFAULT_SYNC_THREADS)),
                               time_limit=options.get("time_limit"),
                               soft_time_limit=options.get("soft_time_limit"))
        self._kinds: dict[str, bool] = {}

    def start(self) -> None:
        super().start()
        self.sync.start()

    def apply(self, task_name: str, message: TaskMessage, on_done: Any) -> None:
        is_async = self._kinds.get(task_name)
        if is_async is None:
            task = self.runner.app.tasks.get(task_name)
            is_async = self._kinds[task_name] = (
                task is not None and coroutines.coroutine_function(task) is not None)
        if is_async:
            super().apply(task_name, message, on_done)
        else:
            self.sync.apply(task_name, message, on_done)

    def terminate(self, task_id: str, signum: int) -> bool:
        return super().terminate(task_id, signum) or self.sync.terminate(task_id, signum)

    def info(self) -> dict:
        return {"implementation": self.name, "max-concurrency": self.limit,
                "sync-threads": self.sync.limit}

    def stop(self, wait: bool = True) -> None:
        super().stop(wait)
        self.sync.stop(wait)
        self.runtime.close()

    @contextmanager
    def _backend_slot(self) -> Iterator[None]:
        """Every greenlet runs on the loop thread, whose ``app.backend`` they
        share (one at a time: they switch only at the body's awaits)."""
        yield
