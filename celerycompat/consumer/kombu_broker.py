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
from typing import Any, Sequence

from kombu import Connection, Consumer, Producer
from kombu.message import Message

from celerycompat.consumer.broker import Delivery, DeliveryCallback

logger = logging.getLogger("celery.worker.consumer.connection")


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
        self.connection_errors: tuple[type[BaseException], ...] = tuple(
            connection.connection_errors
        ) + tuple(connection.channel_errors)

    # -- lifecycle ---------------------------------------------------------

    def connect(self) -> None:
        conf_retry = getattr(self.connection, "_cc_retry", None)
        self.connection.ensure_connection(
            errback=self._on_connection_error, max_retries=conf_retry
        )

    @staticmethod
    def _on_connection_error(exc: BaseException, interval: float) -> None:
        logger.error(
            "consumer: Cannot connect to %s: %s.\nTrying again in %.2f seconds...",
            "broker",
            exc,
            interval,
        )

    def consume(self, queues: Sequence[Any], on_delivery: DeliveryCallback) -> None:
        self._channel = self.connection.default_channel
        bound = [q.bind(self._channel) for q in queues]
        for q in bound:
            q.declare()

        def on_message(message: Message) -> None:
            on_delivery(_to_delivery(message))

        def on_decode_error(message: Any, exc: BaseException) -> None:
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
        if self._prefetch:
            self._apply_qos()
        self._consumer.consume()

    def set_prefetch(self, count: int) -> None:
        self._prefetch = count
        if self._consumer is not None:
            self._apply_qos()

    def _apply_qos(self) -> None:
        apply_global = self._qos_global
        if apply_global is None:
            apply_global = self._default_qos_global()
        assert self._consumer is not None
        self._consumer.qos(prefetch_count=self._prefetch, apply_global=apply_global)

    def _default_qos_global(self) -> bool:
        """Celery's rule: per-channel QoS on RabbitMQ >= 3.3 (AMQP only)."""
        if self.connection.transport.driver_type != "amqp":
            return False
        try:
            props = self.connection.connection.server_properties
            version = props.get("version", b"0.0").decode() if isinstance(
                props.get("version"), bytes) else str(props.get("version", "0.0"))
            major, minor = (int(x) for x in version.split(".")[:2])
        except Exception:  # an unknown server: the AMQP default is safe
            return False
        return (major, minor) >= (3, 3)

    def poll(self, timeout: float) -> None:
        self._maybe_heartbeat()
        try:
            self.connection.drain_events(timeout=timeout)
        except socket.timeout:
            pass
        except self.connection_errors:
            raise
        except Exception as exc:
            # kombu could not even build a message from what the transport
            # handed it (a Redis envelope that is not JSON, headers that are
            # not a mapping, broken base64): the raw message is already off
            # the queue, so it is gone, as Celery's undecodable messages are
            # (A27). What must not happen is the worker dying and, restarted,
            # dying again on the next poison message.
            logger.critical("Received and deleted a message the transport could not "
                            "decode: %r", exc, exc_info=True)

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

    def add_queue(self, queue: Any) -> None:
        """Declare ``queue`` and start consuming from it too (``add_consumer``)."""
        assert self._consumer is not None
        bound = queue.bind(self._channel)
        bound.declare()
        self._consumer.add_queue(bound)
        self._consumer.consume()

    def cancel_queue(self, name: str) -> None:
        """Stop consuming from the queue called ``name`` (``cancel_consumer``)."""
        if self._consumer is not None:
            self._consumer.cancel_by_queue(name)

    def cancel(self) -> None:
        """Stop deliveries; the channel stays open to settle what is in hand."""
        if self._consumer is not None:
            try:
                self._consumer.cancel()
            except self.connection_errors:
                pass

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

    def ack(self, delivery: Delivery) -> None:
        message: Message = delivery.handle
        if not message.acknowledged:
            message.ack()

    def reject(self, delivery: Delivery, requeue: bool) -> None:
        message: Message = delivery.handle
        if not message.acknowledged:
            message.reject(requeue=requeue)

    def purge(self, queues: Sequence[Any]) -> int:
        channel = self.connection.default_channel
        return sum(q.bind(channel).purge() or 0 for q in queues)

    def close(self) -> None:
        try:
            if self._consumer is not None:
                try:
                    self._consumer.cancel()
                except self.connection_errors:
                    pass
        finally:
            self._consumer = None
            self.connection.release()


def _to_delivery(message: Message) -> Delivery:
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
        delivery = _to_delivery(message)
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
