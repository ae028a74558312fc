"""``-P gevent``: the green pool (green.py) on gevent.

gevent's side of `GreenRuntime`: task greenlets in an unbounded
``gevent.pool.Group`` (the consumer counts the slots), time limits as timers
on the hub's loop, a greenlet killed with ``kill(block=False)`` and joined
with a timeout, the watchdog's thread and sleep gevent's originals. The
log lines are those of Celery's gevent pool (``celery.concurrency.gevent``).
"""

from __future__ import annotations

import logging
from types import FrameType
from typing import Any, Callable

import gevent
from gevent import monkey
from gevent.pool import Group

from celerycompat.pools.green import GreenPool
from celerycompat.pools.hub_watchdog import HubWatchdog

logger = logging.getLogger("celery.concurrency.gevent")

#: The watchers of `install_signal_handler` (gevent cancels a collected one).
_signal_watchers: list[Any] = []


def install_signal_handler(signum: int, handler: Any) -> None:
    """``signal.signal`` for a gevent worker: ``handler(signum, None)`` runs in
    a new greenlet when ``signum`` arrives.

    A Python signal handler runs in whatever greenlet is current, and a
    waiting worker's current greenlet is the hub: there any blocking call
    (a ``worker_shutting_down`` receiver that writes to Redis, a log
    handler on a socket) fails with ``BlockingSwitchOutError``, as it does
    under Celery's gevent worker.
    """
    _signal_watchers.append(gevent.signal_handler(signum, handler, signum, None))


class GeventRuntime:
    """`GreenRuntime` on gevent."""

    pool_name = "celery.concurrency.gevent:TaskPool"
    logger = logger

    def __init__(self) -> None:
        self._group: Group | None = None
        self._hub: Any = None

    def start(self) -> None:
        self._hub = gevent.get_hub()
        self._group = Group()

    def spawn_task(self, run: Callable[[Any], None], job: Any) -> Any:
        assert self._group is not None, "start() first"
        greenlet = gevent.Greenlet(run, job)
        self._group.start(greenlet)
        return greenlet

    def spawn(self, function: Callable[..., Any], *args: Any) -> Any:
        return gevent.spawn(function, *args)

    def current(self) -> Any:
        return gevent.getcurrent()

    def kill(self, handle: Any, exc: Any) -> None:
        handle.kill(exc, block=False)

    def dead(self, handle: Any) -> bool:
        return bool(handle.dead)

    def join(self, handle: Any, timeout: float) -> None:
        handle.join(timeout)

    def forget(self, handle: Any) -> None:
        if self._group is not None:
            self._group.discard(handle)

    def join_all(self) -> None:
        if self._group is not None:
            self._group.join()

    def kill_all(self, exc: Any, timeout: float) -> None:
        if self._group is not None:
            self._group.kill(exc, block=True, timeout=timeout)

    def call_later(self, seconds: float, function: Callable[..., Any], *args: Any
                   ) -> Callable[[], None]:
        timer = self._hub.loop.timer(seconds)
        timer.start(function, *args)

        def cancel() -> None:
            timer.stop()
            timer.close()

        return cancel

    def repeat(self, interval: float, function: Callable[[], None]) -> Callable[[], None]:
        # ref=False: the timer alone does not keep the loop running.
        timer = gevent.get_hub().loop.timer(interval, interval, ref=False)
        timer.start(function)

        def cancel() -> None:
            timer.stop()
            timer.close()

        return cancel

    def watchdog(self, describe: Callable[[FrameType], str | None],
                 threshold: float) -> HubWatchdog:
        start_new_thread = monkey.get_original("_thread", "start_new_thread")
        return HubWatchdog(
            describe, threshold, repeat=self.repeat,
            start_thread=lambda function: start_new_thread(function, ()),
            sleep=monkey.get_original("time", "sleep"),
            main_ident=monkey.get_original("_thread", "get_ident")(),
            loop="gevent event loop", logger=logger)


class GeventPool(GreenPool):
    """``-P gevent``."""

    def __init__(self, runner: Any, limit: int, **options: Any) -> None:
        super().__init__(GeventRuntime(), runner, limit, **options)
