"""Publishes celeryev events from the consumer thread (wire contract E1-E3, E18-E20).

One producer on a connection of its own (as Celery's worker has), used only
by the consumer thread, so no locking. Task events are buffered and sent as
one ``task.multi`` message per consumer loop turn (or every 24 events), the
way a Celery worker with an event loop sends them; worker events go out at
once. Events that cannot be published (broker away) are kept, up to a
bound, and sent after the connection comes back.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from typing import Any

from celery.utils.time import utcoffset as celery_utcoffset
from kombu import Exchange, Producer

from celerycompat.protocol.events import BATCHED_GROUPS, group_of, make_event, routing_key

logger = logging.getLogger("celery.events.dispatcher")

#: How many events Celery buffers before flushing a batch early.
BATCH_LIMIT = 24
#: Events kept while the broker is unreachable; older ones are dropped first.
OFFLINE_LIMIT = 10_000
#: Seconds between reconnection attempts of the event connection.
RECONNECT_INTERVAL = 2.0


def event_exchange(connection: Any, name: str) -> Exchange:
    """``celeryev``: topic on AMQP, fanout (PUB/SUB) on Redis and gcpubsub (E1)."""
    kind = "fanout" if connection.transport.driver_type in {"redis", "gcpubsub"} else "topic"
    return Exchange(name, type=kind)


class EventDispatcher:
    """The worker's event publisher.

    Args:
        app: the Celery app (connection settings, ``event_*`` settings, clock).
        hostname: the nodename, sent in every event and as the ``hostname`` header.
        task_events: ``-E`` / ``worker_send_task_events``: all groups when true,
            only ``worker`` events otherwise (E18).
    """

    def __init__(self, app: Any, hostname: str, *, task_events: bool) -> None:
        self.app = app
        self.hostname = hostname
        self.clock = app.clock
        self.pid = os.getpid()
        self.serializer = app.conf.event_serializer
        self.headers = {"hostname": hostname}
        #: Empty means every group (Celery's convention, E19).
        self.groups: set[str] = set() if task_events else {"worker"}
        self.enabled = True
        self._batch: list[dict[str, Any]] = []
        self._offline: deque[tuple[Any, str]] = deque(maxlen=OFFLINE_LIMIT)
        self._connection: Any = None
        self._producer: Producer | None = None
        self._exchange: Exchange | None = None
        self._next_connect = 0.0

    # -- connection --------------------------------------------------------------

    def _ready(self) -> bool:
        if self._producer is not None:
            return True
        now = time.monotonic()
        if now < self._next_connect:
            return False
        self._next_connect = now + RECONNECT_INTERVAL
        # Held from the start, so the liveness watchdog's breaker can shut its
        # sockets: opening the channel waits for the broker without a timeout,
        # and a broker gone silent mid-setup would otherwise hold the consumer
        # thread for good (the breaker found no connection to break).
        self._connection = connection = self.app.connection_for_write()
        try:
            # One attempt, no sleep: this runs on the consumer thread, and
            # kombu's max_retries=1 means a second attempt after 2 s asleep.
            connection.ensure_connection(max_retries=0)
            self._exchange = event_exchange(connection, self.app.conf.event_exchange)
            self._producer = Producer(connection.default_channel, exchange=self._exchange,
                                      serializer=self.serializer, auto_declare=False)
            return True
        except Exception as exc:
            logger.warning("Cannot connect to publish events: %r; will retry", exc)
            self._drop_connection()
            return False

    def _drop_connection(self) -> None:
        producer, connection = self._producer, self._connection
        self._producer = self._connection = None
        if connection is not None:
            try:
                connection.release()
            except Exception:
                logger.debug("closing the event connection failed", exc_info=True)
        del producer

    # -- sending -----------------------------------------------------------------

    def wants(self, event_type: str) -> bool:
        return self.enabled and (not self.groups or group_of(event_type) in self.groups)

    def send(self, event_type: str, **fields: Any) -> None:
        """Send one event now (worker group) or at the next `flush` (task group)."""
        if not self.wants(event_type):
            return
        # The offset as the installed Celery computes it: an int (floor
        # division) before 5.7, the exact float since.
        event = make_event(event_type, hostname=self.hostname, pid=self.pid,
                           clock=self.clock.forward(), offset=celery_utcoffset(), **fields)
        if group_of(event_type) in BATCHED_GROUPS:
            self._batch.append(event)
            if len(self._batch) >= BATCH_LIMIT:
                self.flush()
        else:
            self._publish(event, routing_key(event_type))

    def flush(self) -> None:
        """Send buffered task events as one ``task.multi`` message, and any backlog."""
        if self._offline and self._ready():
            backlog = list(self._offline)
            self._offline.clear()
            for body, key in backlog:
                self._publish(body, key)
        if self._batch:
            batch, self._batch = self._batch, []
            self._publish(batch, "task.multi")

    def _publish(self, body: Any, key: str) -> None:
        if not self._ready():
            self._offline.append((body, key))
            return
        assert self._producer is not None and self._exchange is not None
        try:
            self._producer.publish(
                body, routing_key=key, exchange=self._exchange.name,
                declare=[self._exchange], serializer=self.serializer,
                headers=self.headers, delivery_mode=1, retry=False,
            )
        except Exception as exc:
            logger.warning("Could not publish event(s) (%s): %r; buffering", key, exc)
            self._offline.append((body, key))
            self._drop_connection()

    # -- remote control (E19) -------------------------------------------------------

    def enable_task_events(self) -> bool:
        """Add the task group; False when it was there already (Celery's answer)."""
        if self.groups and "task" not in self.groups:
            self.groups.add("task")
            return True
        return False

    def disable_task_events(self) -> bool:
        if "task" in self.groups:
            self.groups.discard("task")
            return True
        return False

    def close(self) -> None:
        self.flush()
        self._drop_connection()
