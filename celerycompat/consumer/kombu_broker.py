"""The `Broker` adapter for any kombu transport (Redis, RabbitMQ, filesystem, SQS...).

This is kombu's one-message-at-a-time path: every delivery goes through
kombu's own channel and QoS, so the key layout on Redis (``unacked``,
``unacked_index``, the visibility-timeout restore) and the AMQP QoS are
exactly what a stock Celery worker produces. It is the reference behaviour a
faster native adapter must match.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable, Sequence

from celery.utils.time import humanize_seconds
from kombu import Connection, Consumer, Producer
from kombu.message import Message

from celerycompat.consumer.amqp_acks import AckRuns
from celerycompat.consumer.broker import ConnectStopped, Delivery, DeliveryCallback
from celerycompat.consumer.liveness import (
    amqp_socket,
    break_sockets,
    guarded,
    kombu_sockets,
    readable,
)
from celerycompat.consumer.redis_lease import LeaseKeeper, redis_lease_for

logger = logging.getLogger("celery.worker.consumer.connection")
#: Celery logs its connection retries from the consumer's module.
connect_logger = logging.getLogger("celery.worker.consumer.consumer")
#: Seconds any socket a lost connection's cleanup opens may block (Celery's value).
COLLECT_SOCKET_TIMEOUT = 5.0
#: Frame sets read per poll past the first, while more have already arrived.
AMQP_BURST = 32


class KombuBroker:
    """Consume through a kombu `Connection` the app configured.

    Args:
        connection: a not-yet-connected connection, e.g. from
            ``app.connection_for_read()`` so every ``broker_*`` setting applies.
        qos_global: apply the prefetch count per channel (AMQP ``global=True``),
            as Celery does on RabbitMQ >= 3.3 with classic queues.
    """

    def __init__(self, connection: Connection, *, qos_global: bool | None = None,
                 heartbeat_rate: float = 2.0) -> None:
        self.connection = connection
        self._heartbeat_rate = heartbeat_rate
        self._next_heartbeat_check = 0.0
        self.url_for_log = connection.as_uri()
        self._qos_global = qos_global
        self._consumer: Consumer | None = None
        self._channel: Any = None
        self._prefetch = 0
        self._lease: LeaseKeeper | None = None
        #: ``limit_fetch``: how many more deliveries may come (None: no limit).
        self._window: int | None = None
        #: Deliveries handed out and not settled (the AMQP window is this + room).
        self._outstanding = 0
        #: The prefetch count last sent with ``basic.qos`` (None: none sent).
        self._qos_sent: int | None = None
        #: basic.consume is in effect (False while paused or after `cancel`).
        self._consuming_now = False
        self._cancelled = False
        #: AMQP only: the acks of a consumer turn, sent at its end as runs
        #: (`AckRuns`); None where acks go out one by one as made.
        self._ack_runs: AckRuns | None = None
        self.connection_errors: tuple[type[BaseException], ...] = tuple(
            connection.connection_errors
        ) + tuple(connection.channel_errors)
        #: kombu's transport name (``amqp``, ``redis``...); builds the
        #: transport object, never a connection.
        self.driver_type: str = connection.transport.driver_type

    # -- lifecycle ---------------------------------------------------------

    def connect(self, retry: bool = True, max_retries: int | None = None,
                should_stop: Callable[[], bool] | None = None) -> None:
        """Connect, as Celery's consumer does (``ensure_connected``).

        ``retry`` false: one attempt, its error raised. Otherwise kombu's
        ``ensure_connection`` with Celery's backoff (2, 4, 6... up to 30 s)
        and log lines, at most ``max_retries`` retries (None: forever; past
        them kombu's ``OperationalError`` is raised). ``should_stop`` is
        asked every second of the waits: true ends them with `ConnectStopped`
        (a shutdown requested while the broker is away).
        """
        if not retry:
            self.connection.connect()
            return
        attempts = 0

        def on_error(exc: BaseException, interval: float) -> None:
            nonlocal attempts
            if getattr(self.connection, "alt", None) and interval == 0:
                step = "Will retry using next failover."
            else:
                if interval > 0:
                    attempts += 1
                step = (f"Trying again {humanize_seconds(interval, 'in', ' ')}... "
                        f"({attempts}/{max_retries})")
            connect_logger.error("consumer: Cannot connect to %s: %s.\n%s\n",
                                 self.connection.as_uri(), exc, step)

        def check_stop() -> None:
            if should_stop is not None and should_stop():
                raise ConnectStopped()

        self.connection.ensure_connection(on_error, max_retries, callback=check_stop)

    @guarded("consume")
    def consume(self, queues: Sequence[Any], on_delivery: DeliveryCallback) -> None:
        self._channel = self.connection.default_channel
        bound = [q.bind(self._channel) for q in queues]
        for q in bound:
            q.declare()
        self._ack_runs = _new_ack_runs() if self.driver_type == "amqp" else None
        acks = self._ack_runs

        def on_message(message: Message) -> None:
            self._taken()
            if acks is not None:
                acks.delivered(message)
            on_delivery(to_delivery(message))

        def on_decode_error(message: Any, exc: BaseException) -> None:
            self._taken()
            on_delivery(_undecodable(message, exc))

        self._consumer = Consumer(
            self._channel,
            queues=bound,
            on_message=on_message,
            on_decode_error=on_decode_error,
            accept=None,
            no_ack=False,
            auto_declare=False,
        )
        self._gate_virtual_qos()
        if self._prefetch or self._window is not None:
            self._apply_qos()
        if self._window != 0:
            self._consumer.consume()
            self._consuming_now = True
        self._lease = redis_lease_for(self._channel)
        if self._lease is not None:
            qos = self._channel.qos
            self._lease.start(lambda: qos._delivered)

    @guarded("basic.qos")
    def set_prefetch(self, count: int) -> None:
        self._prefetch = count
        if self._consumer is not None:
            self._apply_qos()

    def _apply_qos(self) -> None:
        count = self._effective_prefetch()
        if count == self._qos_sent:
            return
        apply_global = self._qos_global
        if apply_global is None:
            apply_global = self._default_qos_global()
        assert self._consumer is not None
        self._consumer.qos(prefetch_count=count, apply_global=apply_global)
        self._qos_sent = count

    def _effective_prefetch(self) -> int:
        """The prefetch count, narrowed by ``limit_fetch`` where the broker
        pushes (AMQP): what is in hand plus the room, never 0 (AMQP's "no
        limit"; a room of 0 pauses consuming instead)."""
        if self._window is None or self._virtual_qos():
            return self._prefetch
        count = max(1, self._outstanding + self._window)
        return min(count, self._prefetch) if self._prefetch else count

    def _virtual_qos(self) -> bool:
        """kombu's virtual transports (Redis) pull, asking ``qos.can_consume``."""
        return hasattr(getattr(self._channel, "qos", None), "can_consume")

    def _gate_virtual_qos(self) -> None:
        """Make a virtual transport ask the fetch window before each fetch (as
        Celery's ``worker_disable_prefetch`` does on Redis)."""
        if not self._virtual_qos():
            return
        qos = self._channel.qos
        allowed = qos.can_consume

        def can_consume() -> bool:
            return (self._window is None or self._window > 0) and allowed()

        qos.can_consume = can_consume

    def _taken(self) -> None:
        self._outstanding += 1
        if self._window:
            self._window -= 1

    def _settled(self) -> None:
        self._outstanding = max(0, self._outstanding - 1)

    def set_demand(self, wanted: int) -> None:
        """kombu's transports fetch (or are pushed) one message at a time."""

    @guarded("basic.qos")
    def limit_fetch(self, room: int | None) -> None:
        """On AMQP the broker pushes: the QoS window becomes what is in hand
        plus ``room``, and a room of 0 cancels consuming until there is room
        again (messages already on the wire still arrive). Virtual transports
        pull, and ask `_gate_virtual_qos`'s check before each fetch."""
        self._window = room
        if self._consumer is None or self._virtual_qos():
            return
        if room == 0:
            if self._consuming_now:
                self._consuming_now = False
                self._consumer.cancel()
            return
        self._apply_qos()
        if not self._consuming_now and not self._cancelled:
            self._consumer.consume()
            self._consuming_now = True

    def _default_qos_global(self) -> bool:
        """Celery's rule: per-channel QoS on RabbitMQ >= 3.3 (AMQP only)."""
        if self.driver_type != "amqp":
            return False
        try:
            props = self.connection.connection.server_properties
            version = props.get("version", b"0.0").decode() if isinstance(
                props.get("version"), bytes) else str(props.get("version", "0.0"))
            major, minor = (int(x) for x in version.split(".")[:2])
        except Exception:  # an unknown server: the AMQP default is safe
            return False
        return (major, minor) >= (3, 3)

    @guarded("poll", waits=True)
    def poll(self, timeout: float) -> None:
        self._send_acks()
        self._maybe_heartbeat()
        if not self._drain(timeout):
            return
        # py-amqp hands out one frame set per call: read what has already
        # arrived before the consumer goes round again.
        sock = self._amqp_socket()
        for _ in range(AMQP_BURST if sock is not None else 0):
            if not readable([sock], 0) or not self._drain(0):
                break

    def _drain(self, timeout: float) -> bool:
        """One ``drain_events``; False if nothing came in time or a message was lost.

        A message kombu could not even build from what the transport handed
        it (a Redis envelope that is not JSON, headers that are not a
        mapping, broken base64) is already off the queue, so it is gone, as
        Celery's undecodable messages are (A27): one critical line. What must
        not happen is the worker dying and, restarted, dying again on the
        next poison message. Connection errors propagate.
        """
        try:
            self.connection.drain_events(timeout=timeout)
        except socket.timeout:
            return False
        except self.connection_errors:
            raise
        except Exception as exc:
            logger.critical("Received and deleted a message the transport could not "
                            "decode: %r", exc, exc_info=True)
            return False
        return True

    def _amqp_socket(self) -> Any:
        """The socket of a live py-amqp connection, else None.

        Read from the socket transport (``_transport``): py-amqp's ``sock``
        and ``transport`` properties, on a connection it has collected (the
        broker closed it), warn (``AMQPDeprecationWarning``) and connect.
        """
        if self.driver_type != "amqp":
            return None
        return amqp_socket(self.connection)

    def _maybe_heartbeat(self) -> None:
        """AMQP heartbeats, ``broker_heartbeat_checkrate`` times per interval.

        Sending them keeps RabbitMQ from closing an idle worker's connection;
        checking them is how a silently dead connection is noticed (it raises
        a connection error, and the consumer reconnects).
        """
        interval = self.connection.heartbeat
        if not interval or not self.connection.supports_heartbeats:
            return
        now = time.monotonic()
        if now >= self._next_heartbeat_check:
            # A tick only compares clocks (and sends when one is due), so a
            # cheap once-a-second tick never lets the negotiated interval
            # (often shorter than the one asked for) lapse.
            self._next_heartbeat_check = now + min(1.0, interval / max(self._heartbeat_rate, 1.0))
            self.connection.heartbeat_check(rate=self._heartbeat_rate)

    @guarded("add_consumer")
    def add_queue(self, queue: Any) -> None:
        """Declare ``queue`` and start consuming from it too (``add_consumer``)."""
        assert self._consumer is not None
        bound = queue.bind(self._channel)
        bound.declare()
        self._consumer.add_queue(bound)
        if self._consuming_now:  # paused: it starts with the others
            self._consumer.consume()

    @guarded("cancel_consumer")
    def cancel_queue(self, name: str) -> None:
        """Stop consuming from the queue called ``name`` (``cancel_consumer``)."""
        if self._consumer is not None:
            self._consumer.cancel_by_queue(name)

    @guarded("basic.cancel")
    def cancel(self) -> None:
        """Stop deliveries; the channel stays open to settle what is in hand."""
        self._cancelled = True
        self._consuming_now = False
        if self._consumer is not None:
            try:
                self._consumer.cancel()
            except self.connection_errors:
                pass

    @guarded("publish")
    def republish(self, delivery: Delivery) -> None:
        """Publish a copy of a delivered message where it came from (cold shutdown).

        The body is already transport-decoded and decompressed, so it goes
        out as-is, without its ``compression`` header.
        """
        headers = {k: v for k, v in (delivery.headers or {}).items() if k != "compression"}
        properties = delivery.properties or {}
        info = delivery.delivery_info or {}
        producer = Producer(self.connection.default_channel)
        producer.publish(
            delivery.body, exchange=info.get("exchange") or "",
            routing_key=info.get("routing_key"), headers=headers,
            content_type=delivery.content_type, content_encoding=delivery.content_encoding,
            correlation_id=properties.get("correlation_id"),
            reply_to=properties.get("reply_to"), priority=properties.get("priority"),
            delivery_mode=properties.get("delivery_mode") or 2,
        )

    @guarded("ack")
    def ack(self, delivery: Delivery) -> None:
        """Ack now, or on AMQP at the end of the consumer's turn (the next
        `poll` or `flush`), where the turn's acks go as runs."""
        message: Message = delivery.handle
        if message.acknowledged:
            return
        if self._ack_runs is not None and message.channel is self._channel:
            # kombu's own state, so every ``acknowledged`` check (ours, a
            # project's Request class) sees the ack already made.
            message._state = "ACK"
            self._ack_runs.owe(message)
        else:
            message.ack()
        self._settled()

    def _send_acks(self) -> None:
        """The acks owed (`ack`): one ``basic.ack(multiple=True)`` for those
        that settle the channel's oldest deliveries, single ones for the rest
        (a delivery still in hand, an ETA task say, is never covered)."""
        acks = self._ack_runs
        if acks is None or not acks.owed:
            return
        last, singles = acks.take()
        channel = self._channel
        if last is not None:
            channel.basic_ack(last.delivery_tag, multiple=True)
        for message in singles:
            channel.basic_ack(message.delivery_tag)

    @guarded("reject")
    def reject(self, delivery: Delivery, requeue: bool) -> None:
        message: Message = delivery.handle
        if not message.acknowledged:
            message.reject(requeue=requeue)
            if self._ack_runs is not None:
                self._ack_runs.discard(message)
            self._settled()

    @guarded("purge")
    def purge(self, queues: Sequence[Any]) -> int:
        channel = self.connection.default_channel
        return sum(q.bind(channel).purge() or 0 for q in queues)

    def break_connection(self) -> None:
        """Make every socket of the connection fail at once (the watchdog's
        breaker, and the first thing done with a connection found lost), so
        no later call, a graceful close included, can block on it."""
        break_sockets(kombu_sockets(self.connection))

    def abandon(self) -> Any:
        """The connection is lost: break it, then free it without the close
        handshake (kombu's ``collect``, as Celery does since #9705). Nothing
        survives an AMQP channel, and kombu's Redis path restores its own
        un-acked messages, so nothing is owed to the next connection."""
        self.break_connection()
        if self._lease is not None:
            self._lease.stop()
        self._consumer = None
        # Acks not sent die with the channel: the broker redelivers those.
        self._ack_runs = None
        try:
            self.connection.collect(socket_timeout=COLLECT_SOCKET_TIMEOUT)
        except Exception:
            logger.debug("error while collecting the lost connection", exc_info=True)
        return None

    def adopt(self, owed: Any, running: Sequence[Delivery]) -> set:
        """Nothing is ever owed here (`abandon` returns None): nothing is kept."""
        return set()

    #: kombu's acks are channel calls: no result store can make them.
    ack_server: tuple | None = None

    def ack_ticket(self, delivery: Delivery, early: bool) -> Any:
        return None

    def hand_over(self, delivery: Delivery) -> None:
        """Never called: there are no tickets here."""

    @guarded("ack")
    def flush(self) -> None:
        """The acks owed now (on AMQP they otherwise wait for the next poll)."""
        self._send_acks()

    @guarded("close")
    def close(self) -> None:
        if self._lease is not None:
            self._lease.stop()
        try:
            self._send_acks()
            if self._consumer is not None:
                try:
                    self._consumer.cancel()
                except self.connection_errors:
                    pass
        finally:
            self._consumer = None
            self.connection.release()


def _new_ack_runs() -> AckRuns:
    return AckRuns(tag_of=lambda message: message.delivery_tag,
                   settled=lambda message: message.acknowledged)


def to_delivery(message: Message) -> Delivery:
    headers = message.headers
    return Delivery(
        body=message.body,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        headers=headers,
        properties=message.properties or {},
        delivery_info=message.delivery_info or {},
        handle=message,
        decode_error=_first_error(message),
    )


def _first_error(message: Message) -> BaseException | None:
    errors = getattr(message, "errors", None)
    if errors:
        return errors[0][1]
    return None


def _undecodable(message: Any, exc: BaseException) -> Delivery:
    """A delivery kombu could not turn into a message (corrupt envelope)."""
    if isinstance(message, Message):
        delivery = to_delivery(message)
        delivery.decode_error = exc
        return delivery
    return Delivery(
        body=b"",
        content_type=None,
        content_encoding=None,
        headers={},
        properties={},
        delivery_info={},
        handle=message,
        decode_error=exc,
    )
