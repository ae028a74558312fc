"""The consumer's queue of finished work, safe to wait on where signals land.

Pool threads, prefork's supervisor and result writers put outcomes here; the
consumer (the main thread, the one Python runs signal handlers on) takes
them. CPython 3.11's ``queue.SimpleQueue.get(timeout=...)`` can block
until the next put when a signal handler runs during the wait: if the
handler outlasts what was left of the timeout, the retry waits with a
negative timeout, which means for ever (seen with a SIGQUIT: the worker's
cold shutdown waited until the running task ended, 20 s later). So items
go through a ``SimpleQueue`` (its put and ``get_nowait`` are C and never
block), and a consumer with nothing to take waits on a
lock's timed acquire, which survives signals; a producer releases the lock
only while the consumer is waiting, so the common path costs one attribute
read more than a bare ``SimpleQueue``.
"""

from __future__ import annotations

import queue
import threading
from typing import Any


class DoneQueue:
    """A multi-producer, single-consumer queue (`SimpleQueue`'s methods)."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[Any] = queue.SimpleQueue()
        #: Held while nothing is to be taken; a producer releases it to wake
        #: the consumer (a lock's timed acquire survives signals).
        self._wake = threading.Lock()
        self._wake.acquire()
        self._waiting = False

    def put(self, item: Any) -> None:
        self._items.put(item)
        # The item is in before `_waiting` is read: a consumer that sets it
        # after this read finds the item when it looks again.
        if self._waiting:
            try:
                self._wake.release()
            except RuntimeError:
                pass  # released already by another producer

    def get_nowait(self) -> Any:
        """An item, or `queue.Empty`."""
        return self._items.get_nowait()

    def get(self, timeout: float) -> Any:
        """An item, waiting up to ``timeout`` seconds for one; `queue.Empty` then
        (also, now and then, sooner: after a wake-up meant for an earlier wait)."""
        items = self._items
        try:
            return items.get_nowait()
        except queue.Empty:
            pass
        self._waiting = True
        try:
            if items.empty():
                self._wake.acquire(timeout=timeout)
        finally:
            self._waiting = False
        return items.get_nowait()

    def empty(self) -> bool:
        return self._items.empty()
