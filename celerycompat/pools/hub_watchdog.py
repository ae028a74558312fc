"""Notices code that blocks a green pool's event loop, and says who and how long.

Under gevent or eventlet one thread runs everything: the consumer, remote control,
events and every task greenlet. A task that computes for seconds, or makes
a blocking call gevent does not patch (a C library doing its own I/O,
``time.sleep`` captured before patching), stops all of it: no broker
heartbeat, no ``inspect`` reply, no other task, and no time limit fires
(they are timers on that same loop). Nothing in the log says why.

The watchdog is a real OS thread (the library's original
``start_new_thread``, so patching does not turn it into a greenlet) plus a
repeating timer on the hub that records when the loop last turned. When the loop has not turned
for ``threshold`` seconds, the thread looks at what the main thread is
executing (``sys._current_frames``), asks the pool which task that frame
belongs to, and logs a warning naming the task and the code line; when the
loop turns again it logs how long the block lasted. One pair of lines per
block, however long it lasts.

gevent's own monitor thread (``GEVENT_MONITOR_THREAD_ENABLE``) can detect
the same, but it reports only "blocked for more than max_blocking_time",
prints a dump of every greenlet to stderr (1000 of them with ``-c 1000``)
and traces every greenlet switch; eventlet's (``EVENTLET_NOBLOCK``, which
Celery's eventlet worker turns on) raises in whatever code is running.
This costs one timer callback per tick. What is library-specific (the real
thread and sleep, the repeating timer, the names) is the pool runtime's
(gevent_pool.py, eventlet_pool.py).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from types import FrameType
from typing import Any, Callable, Optional

#: Seconds the loop may stay blocked before the watchdog says so. gevent's
#: own setting for its monitor, ``GEVENT_MAX_BLOCKING_TIME``, overrides it.
DEFAULT_THRESHOLD = 1.0

#: ``frame -> "Task name[id]"`` or ``None`` if the frame runs no task.
Describe = Callable[[FrameType], Optional[str]]


def threshold_from_env(environ: Any = None) -> float:
    """``GEVENT_MAX_BLOCKING_TIME`` if set to a positive number, else the default."""
    value = (os.environ if environ is None else environ).get("GEVENT_MAX_BLOCKING_TIME")
    try:
        seconds = float(value) if value else 0.0
    except ValueError:
        seconds = 0.0
    return seconds if seconds > 0 else DEFAULT_THRESHOLD


def where(frame: FrameType) -> str:
    """``file:line in function`` of the innermost frame."""
    code = frame.f_code
    return f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


class HubWatchdog:
    """Build and start it from the thread that runs the hub (the main thread).

    ``repeat(interval, function)`` runs ``function`` on the hub every
    ``interval`` seconds and returns the cancel; ``start_thread(function)``
    starts a real OS thread and ``sleep`` is the real ``time.sleep``;
    ``main_ident`` is the real ``get_ident`` of the hub's thread; ``loop``
    names the loop in the log lines, which go to ``logger``.
    """

    def __init__(self, describe: Describe, threshold: float, *,
                 repeat: Callable[[float, Callable[[], None]], Callable[[], None]],
                 start_thread: Callable[[Callable[[], None]], None],
                 sleep: Callable[[float], None], main_ident: int,
                 loop: str, logger: logging.Logger) -> None:
        self.describe = describe
        self.repeat = repeat
        self.start_thread = start_thread
        self.sleep = sleep
        self.loop = loop
        self.logger = logger
        self.threshold = float(threshold)
        self.tick = min(0.5, max(0.02, self.threshold / 4))
        self._beat = time.monotonic()
        self._stall: tuple[float, float] | None = None
        """``(began, ended)`` of the last stall the hub timer measured."""
        self._block: tuple[float, str] | None = None
        """``(began, who)`` of the block being reported."""
        self._cancel: Callable[[], None] | None = None
        self._main_ident = main_ident
        self._running = False

    def start(self) -> None:
        self._beat = time.monotonic()
        self._cancel = self.repeat(self.tick, self.on_tick)
        self._running = True
        self.start_thread(self._watch)

    def stop(self) -> None:
        self._running = False
        cancel, self._cancel = self._cancel, None
        if cancel is not None:
            cancel()

    # -- on the hub ------------------------------------------------------------

    def on_tick(self, now: float | None = None) -> None:
        """The hub's timer: the loop is turning (and how long it last did not)."""
        now = time.monotonic() if now is None else now
        if now - self._beat > self.threshold:
            self._stall = (self._beat, now)
        self._beat = now

    # -- on the watchdog thread -------------------------------------------------

    def _watch(self) -> None:
        while self._running:
            self.sleep(self.tick)
            try:
                self.check()
            except Exception:  # never let the thread die silently
                self.logger.exception("%s watchdog failed", self.loop)

    def check(self, now: float | None = None) -> None:
        """One look at the loop (the thread calls it every tick)."""
        now = time.monotonic() if now is None else now
        began = self._beat
        blocked = now - began >= self.threshold
        block = self._block
        if block is not None and (not blocked or block[0] != began):
            self._block = None
            self._report_end(block, began)
        if blocked and self._block is None:
            who = self._culprit()
            self._block = (began, who)
            self.logger.warning(
                "%s has blocked the %s for %.2fs: no other task, broker I/O, remote "
                "control or time limit runs until it yields (CPU-bound code or a "
                "blocking call %s does not patch)",
                who, self.loop, now - began, self.loop.split()[0])

    def _report_end(self, block: tuple[float, str], last_beat: float) -> None:
        """The loop turned again: how long the block lasted, as the hub timer
        measured it (else up to its latest turn, at most a tick late)."""
        began, who = block
        stall = self._stall
        ended = stall[1] if stall is not None and stall[0] == began else last_beat
        self.logger.warning("%s blocked the %s for %.2fs", who, self.loop, ended - began)

    def _culprit(self) -> str:
        """What the main thread runs: a task (named) or other code (located)."""
        frame = sys._current_frames().get(self._main_ident)
        if frame is None:
            return "Unknown code"
        innermost = frame
        while frame is not None:
            who = self.describe(frame)
            if who is not None:
                return f"{who} (at {where(innermost)})"
            frame = frame.f_back
        return f"Code outside any task (at {where(innermost)})"
