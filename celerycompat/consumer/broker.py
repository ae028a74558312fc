"""The broker adapter interface the consumer talks to.

The consumer never touches kombu objects directly: it sees `Delivery`
values and calls `ack`/`reject` on a `Broker`. That seam is what lets a native
Redis adapter (batched pops and acks in kombu's own ``unacked`` /
``unacked_index`` layout) replace kombu's one-message-at-a-time path without
the consumer, pools or execution noticing.

Every `Broker` method but one is called from the consumer thread only:
kombu channels and py-amqp connections are not thread-safe, so the adapter
does not need to be either. The exception is `Broker.break_connection`,
which the liveness watchdog calls from its own thread to unblock a consumer
stuck in a broker call; it only shuts sockets down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence


@dataclass
class Delivery:
    """One message as the broker handed it over, before any decoding.

    ``body`` is already transport-decoded (Redis base64 undone, compression
    undone when the transport does it) but still serialized: turning it into
    args/kwargs is the protocol layer's job, so that the accept-content check
    happens in one place.
    """

    body: bytes
    content_type: str | None
    content_encoding: str | None
    headers: dict[str, Any] | Any
    properties: dict[str, Any]
    delivery_info: dict[str, Any]
    handle: Any = field(repr=False, default=None)
    """Opaque to everyone but the adapter that produced it (a kombu Message)."""
    decode_error: BaseException | None = None
    """Set when the transport itself could not decode the envelope (A27)."""


DeliveryCallback = Callable[[Delivery], None]


class ConnectStopped(Exception):
    """A shutdown was requested while `Broker.connect` waited to retry."""


class Broker(Protocol):
    """What the consumer needs from a message transport."""

    url_for_log: str
    """The broker URL with its password masked, for the startup log line."""

    connection: Any
    """The kombu ``Connection``: what the pidbox, gossip and ``inspect stats``
    (its ``info()``) use beside the task messages."""

    connection_errors: tuple[type[BaseException], ...]
    """What this transport raises when its connection is lost."""

    driver_type: str
    """kombu's name of the transport (``amqp``, ``redis``, ...): which of
    Celery's optional parts (gossip, mingle) it supports."""

    def connect(self, retry: bool = True, max_retries: int | None = None,
                should_stop: Callable[[], bool] | None = None) -> None:
        """Open the connection: once, or retrying with backoff up to ``max_retries``
        (None: forever); `ConnectStopped` once ``should_stop()`` turns true."""

    def consume(self, queues: Sequence[Any], on_delivery: DeliveryCallback) -> None:
        """Declare ``queues`` and start delivering their messages to ``on_delivery``."""

    def set_prefetch(self, count: int) -> None:
        """Cap un-acked deliveries at ``count`` (0 means no cap)."""

    def limit_fetch(self, room: int | None) -> None:
        """Take at most ``room`` more deliveries, beyond those in hand, until
        told again (``--disable-prefetch``; 0: none, None: the prefetch
        count alone limits). Called every consumer turn with a fresh value."""

    def set_demand(self, wanted: int) -> None:
        """How many deliveries the pool could start right now (free slots
        that nothing reserved will fill). Called every consumer turn; a
        transport that fetches in batches may wait for a fuller batch while
        this is 0, since nothing would start sooner."""

    def poll(self, timeout: float) -> None:
        """Deliver whatever has arrived, waiting at most ``timeout`` seconds."""

    def add_queue(self, queue: Any) -> None:
        """Declare ``queue`` and consume from it as well."""

    def cancel_queue(self, name: str) -> None:
        """Stop consuming from the queue called ``name``."""

    def cancel(self) -> None:
        """Stop deliveries; keep the connection to settle messages in hand."""

    def republish(self, delivery: Delivery) -> None:
        """Publish a copy of ``delivery`` to where it was sent (an acked message returned)."""

    def ack(self, delivery: Delivery) -> None:
        """Acknowledge: the broker forgets the message."""

    #: The Redis server acks are made on (`riding_acks.server_of`), for a
    #: broker whose acks a result store on that server can make itself;
    #: None for the others.
    ack_server: tuple | None

    def ack_ticket(self, delivery: Delivery, early: bool) -> Any:
        """An `AckTicket` for a result store to ack ``delivery`` with the
        task's result (backends/riding_acks.py); None if ``ack_server`` is."""

    def hand_over(self, delivery: Delivery) -> None:
        """An early-ack message with a ticket: its run acks it, so it stops
        counting against the prefetch window now; `ack` still follows."""

    def flush(self) -> None:
        """Send now the acks owed (a broker that batches them for its next
        poll): an ``acks_late`` result has just been stored, and until its
        ack lands a killed worker runs the task again."""

    def reject(self, delivery: Delivery, requeue: bool) -> None:
        """Reject: drop the message, or give it back to the queue."""

    def purge(self, queues: Sequence[Any]) -> int:
        """Delete every ready message of ``queues``; return how many went."""

    def close(self) -> None:
        """Close; the broker gets every un-acked message back."""

    def break_connection(self) -> None:
        """Shut every socket down, from any thread: blocked calls fail at once."""

    def abandon(self) -> Any:
        """The connection is lost: release it without talking to the broker.

        Returns what it still owed the broker (acks, held messages) when a
        new connection can settle that (`adopt`), else None.
        """

    def adopt(self, owed: Any, running: Sequence[Delivery]) -> set:
        """Settle on this connection what a lost one owed (``abandon``'s
        return, never None); ``running`` are the deliveries of tasks still
        running. Returns the delivery tags now held here (their tasks' acks
        go through this connection)."""
