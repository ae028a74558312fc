"""``-P eventlet``: the green pool (green.py) on eventlet.

eventlet's side of `GreenRuntime`: task green threads spawned with
``eventlet.spawn`` and tracked in a set (the consumer counts the slots),
time limits as ``schedule_call_global`` timers on the hub, a green thread
killed with ``greenthread.kill`` (which runs the target at once, until it
next waits) and joined by polling, the watchdog's thread and sleep
eventlet's originals. Everything else (time limits that work, terminate,
the watchdog naming a task that blocks the hub) is the green pool's.

As Celery's eventlet pool, it sends ``eventlet_pool_started`` when it
starts, ``eventlet_pool_apply`` for each task (``target`` is the function
that runs it, ``args`` the task name and id: Celery's are its tracer's
arguments), ``eventlet_pool_preshutdown`` and ``eventlet_pool_postshutdown``
around the warm stop, each with the pool as sender; ``inspect stats``
shows its ``free-threads`` and ``running-threads``. Log lines are those of
Celery's eventlet pool (``celery.concurrency.eventlet``).
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any, Callable

import eventlet
from celery import signals
from eventlet import greenthread, hubs, patcher

from celerycompat.pools.green import GreenPool
from celerycompat.pools.hub_watchdog import HubWatchdog

logger = logging.getLogger("celery.concurrency.eventlet")

#: How often a join looks whether a green thread has finished.
JOIN_POLL = 0.01


def install_signal_handler(signum: int, handler: Any) -> None:
    """``signal.signal`` for an eventlet worker: ``handler(signum, None)`` runs
    in a new green thread when ``signum`` arrives.

    Python runs a signal handler in whatever green thread is current, and a
    waiting worker's is the hub, where a receiver of ``worker_shutting_down``
    that does I/O could not wait.
    """
    signal.signal(signum, lambda signo, frame: eventlet.spawn_n(handler, signo, None))


class EventletRuntime:
    """`GreenRuntime` on eventlet."""

    pool_name = "celery.concurrency.eventlet:TaskPool"
    logger = logger

    def __init__(self) -> None:
        self._tracked: set[Any] = set()

    def start(self) -> None:
        hubs.get_hub()

    def spawn_task(self, run: Callable[[Any], None], job: Any) -> Any:
        # eventlet.spawn schedules the start: the handle exists before run(job).
        handle = eventlet.spawn(run, job)
        self._tracked.add(handle)
        handle.link(self._tracked_done)
        return handle

    def _tracked_done(self, handle: Any) -> None:
        self._tracked.discard(handle)

    def spawn(self, function: Callable[..., Any], *args: Any) -> Any:
        return eventlet.spawn(function, *args)

    def current(self) -> Any:
        return greenthread.getcurrent()

    def kill(self, handle: Any, exc: Any) -> None:
        if not handle.dead:
            greenthread.kill(handle, exc)

    def dead(self, handle: Any) -> bool:
        return bool(handle.dead)

    def join(self, handle: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not handle.dead and time.monotonic() < deadline:
            eventlet.sleep(JOIN_POLL)

    def forget(self, handle: Any) -> None:
        self._tracked.discard(handle)

    def join_all(self) -> None:
        while self._tracked:
            self.join(next(iter(self._tracked)), 1.0)
            self._tracked = {handle for handle in self._tracked if not handle.dead}

    def kill_all(self, exc: Any, timeout: float) -> None:
        for handle in list(self._tracked):
            self.kill(handle, exc)
        deadline = time.monotonic() + timeout
        while any(not handle.dead for handle in self._tracked) and \
                time.monotonic() < deadline:
            eventlet.sleep(JOIN_POLL)

    def call_later(self, seconds: float, function: Callable[..., Any], *args: Any
                   ) -> Callable[[], None]:
        return hubs.get_hub().schedule_call_global(seconds, function, *args).cancel

    def repeat(self, interval: float, function: Callable[[], None]) -> Callable[[], None]:
        hub = hubs.get_hub()
        timer: list[Any] = []

        def tick() -> None:
            function()
            timer[0] = hub.schedule_call_global(interval, tick)

        timer.append(hub.schedule_call_global(interval, tick))
        return lambda: timer[0].cancel()

    def watchdog(self, describe: Callable[[FrameType], str | None],
                 threshold: float) -> HubWatchdog:
        real_thread = patcher.original("_thread")
        return HubWatchdog(
            describe, threshold, repeat=self.repeat,
            start_thread=lambda function: real_thread.start_new_thread(function, ()),
            sleep=patcher.original("time").sleep, main_ident=real_thread.get_ident(),
            loop="eventlet hub", logger=logger)


class EventletPool(GreenPool):
    """``-P eventlet``, with Celery's eventlet pool signals."""

    def __init__(self, runner: Any, limit: int, **options: Any) -> None:
        super().__init__(EventletRuntime(), runner, limit, **options)

    def start(self) -> None:
        super().start()
        signals.eventlet_pool_started.send(sender=self)

    def apply(self, task_name: str, message: Any, on_done: Any) -> None:
        signals.eventlet_pool_apply.send(sender=self, target=self._run,
                                         args=(task_name, message.id), kwargs={})
        super().apply(task_name, message, on_done)

    def stop(self, wait: bool = True) -> None:
        if wait:
            signals.eventlet_pool_preshutdown.send(sender=self)
        super().stop(wait)
        if wait:
            signals.eventlet_pool_postshutdown.send(sender=self)

    def info(self) -> dict:
        running = len(self._jobs)
        return {**super().info(), "free-threads": max(0, self.limit - running),
                "running-threads": running}
