"""An in-memory `Broker` for unit tests of the consumer's own rules.

Not a kombu transport: the consumer talks to it through the `Broker`
protocol only (consumer/broker.py), so what a test sees is the consumer's
logic (prefetch, ETA holds, revokes, settling order, shutdown) and nothing
of a transport's. Messages are built with the app's own ``as_task_v2`` and
serializer, so they are what a Celery client sends. Everything the broker
is told is kept in order in `events` for the test to read.

Not a test module (its name is not ``test_*``).
"""

from __future__ import annotations

import itertools
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kombu.serialization import dumps

from celerycompat.consumer.broker import Delivery


@dataclass(eq=False)
class MemoryMessage:
    """The delivery's ``handle``: what an adapter keeps to settle it."""

    delivery_tag: int
    queue: str


class MemoryConnection:
    """What the consumer reads of a broker's connection (``inspect stats``)."""

    def info(self) -> dict:
        return {"transport": "memory", "hostname": "localhost"}


class MemoryBroker:
    """Queues in memory, a prefetch window, and a record of every settle."""

    url_for_log = "memory://localhost//"
    driver_type = "memory"
    connection_errors: tuple[type[BaseException], ...] = (ConnectionError,)

    def __init__(self) -> None:
        self.connection = MemoryConnection()
        self.queues: dict[str, deque[Delivery]] = {}
        self.unacked: dict[int, Delivery] = {}
        #: ``(what, task id)`` in order: ``deliver``, ``ack``, ``requeue``, ``drop``.
        self.events: list[tuple[str, str]] = []
        self._consumed: list[str] = []
        self._on_delivery: Callable[[Delivery], None] | None = None
        self._prefetch = 0
        self._room: int | None = None
        self._tags = itertools.count(1)
        self._arrived = threading.Condition()

    # -- what a test does ------------------------------------------------------

    def publish(self, app: Any, name: str, args: Sequence = (), queue: str = "celery",
                **options: Any) -> str:
        """Queue a task message as a Celery client would; returns its id."""
        task_id = options.pop("task_id", None) or str(uuid.uuid4())
        headers, properties, body, _ = app.amqp.as_task_v2(task_id, name, args=list(args),
                                                           **options)
        content_type, content_encoding, data = dumps(body, serializer="json")
        delivery = Delivery(
            body=data.encode() if isinstance(data, str) else data,
            content_type=content_type, content_encoding=content_encoding,
            headers=headers, properties=dict(properties, delivery_tag=None),
            delivery_info={"exchange": "", "routing_key": queue},
            handle=MemoryMessage(0, queue))
        with self._arrived:
            self.queues.setdefault(queue, deque()).append(delivery)
            self._arrived.notify_all()
        return task_id

    def waiting(self, queue: str = "celery") -> int:
        return len(self.queues.get(queue, ()))

    def settled(self, task_id: str) -> list[str]:
        return [what for what, tid in self.events if tid == task_id and what != "deliver"]

    # -- the Broker protocol ------------------------------------------------------

    def connect(self, retry: bool = True, max_retries: int | None = None,
                should_stop: Callable[[], bool] | None = None) -> None:
        return None

    def consume(self, queues: Sequence[Any], on_delivery: Callable[[Delivery], None]) -> None:
        self._consumed = [getattr(queue, "name", queue) for queue in queues]
        self._on_delivery = on_delivery

    def set_prefetch(self, count: int) -> None:
        self._prefetch = count

    def limit_fetch(self, room: int | None) -> None:
        self._room = room

    def set_demand(self, wanted: int) -> None:
        return None

    def poll(self, timeout: float) -> None:
        with self._arrived:
            if not self._ready():
                self._arrived.wait(timeout)
            batch = []
            while self._ready():
                batch.append(self._take())
        for delivery in batch:
            assert self._on_delivery is not None
            self._on_delivery(delivery)

    def _ready(self) -> bool:
        if self._on_delivery is None:
            return False
        if self._prefetch and len(self.unacked) >= self._prefetch:
            return False
        if self._room is not None and self._room <= 0:
            return False
        return any(self.queues.get(name) for name in self._consumed)

    def _take(self) -> Delivery:
        name = next(name for name in self._consumed if self.queues.get(name))
        delivery = self.queues[name].popleft()
        tag = next(self._tags)
        delivery.handle = MemoryMessage(tag, name)
        self.unacked[tag] = delivery
        if self._room is not None:
            self._room -= 1
        self.events.append(("deliver", delivery.headers["id"]))
        return delivery

    def add_queue(self, queue: Any) -> None:
        name = getattr(queue, "name", queue)
        if name not in self._consumed:
            self._consumed.append(name)

    def cancel_queue(self, name: str) -> None:
        self._consumed = [queue for queue in self._consumed if queue != name]

    def cancel(self) -> None:
        self._on_delivery = None

    def republish(self, delivery: Delivery) -> None:
        with self._arrived:
            self.queues.setdefault(delivery.handle.queue, deque()).append(delivery)
            self._arrived.notify_all()

    def ack(self, delivery: Delivery) -> None:
        self._settle(delivery, "ack")

    def reject(self, delivery: Delivery, requeue: bool) -> None:
        self._settle(delivery, "requeue" if requeue else "drop")
        if requeue:
            with self._arrived:
                self.queues.setdefault(delivery.handle.queue, deque()).appendleft(delivery)
                self._arrived.notify_all()

    def _settle(self, delivery: Delivery, what: str) -> None:
        assert self.unacked.pop(delivery.handle.delivery_tag, None) is delivery, \
            f"{what} of a message not held: {delivery.headers['id']}"
        self.events.append((what, delivery.headers["id"]))

    def purge(self, queues: Sequence[Any]) -> int:
        count = 0
        for queue in queues:
            held = self.queues.get(getattr(queue, "name", queue))
            if held:
                count += len(held)
                held.clear()
        return count

    def close(self) -> None:
        """The broker gets every un-acked message back, as on a real close."""
        for tag in sorted(self.unacked):
            delivery = self.unacked.pop(tag)
            self.queues.setdefault(delivery.handle.queue, deque()).appendleft(delivery)

    def break_connection(self) -> None:
        return None

    def abandon(self) -> Any:
        self.close()
        return None

    def adopt(self, owed: Any, running: Sequence[Delivery]) -> set:
        return set()

    ack_server = None

    def ack_ticket(self, delivery: Delivery, early: bool) -> Any:
        return None

    def hand_over(self, delivery: Delivery) -> None:
        """Never called: there are no tickets here."""

    def flush(self) -> None:
        """Acks are sent as they are made here."""
