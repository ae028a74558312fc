"""worker-online, worker-heartbeat every ``freq`` seconds, worker-offline (E5, E23).

Monitors consider a worker alive while heartbeats keep coming within twice
``freq``, so the interval reported must be the one used.
"""

from __future__ import annotations

import time
from typing import Callable

from celery import signals

from celerycompat.events.dispatcher import EventDispatcher
from celerycompat.protocol.events import worker_fields


class Heart:
    """Sends the worker's liveness events; `tick` is called every consumer loop turn."""

    def __init__(self, dispatcher: EventDispatcher, *, interval: float,
                 active: Callable[[], int], processed: Callable[[], int]) -> None:
        self.dispatcher = dispatcher
        self.interval = float(interval)
        self._active = active
        self._processed = processed
        self._next = 0.0

    def _send(self, event_type: str) -> None:
        self.dispatcher.send(event_type, **worker_fields(
            freq=self.interval, active=self._active(), processed=self._processed()))

    def start(self) -> None:
        self._send("worker-online")
        self._next = time.monotonic() + self.interval

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            self._send("worker-heartbeat")
            signals.heartbeat_sent.send(sender=self)

    def seconds_to_next(self) -> float:
        return max(0.0, self._next - time.monotonic())

    def stop(self) -> None:
        self._send("worker-offline")
