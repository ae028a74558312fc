"""The messages the consumer does not run, announced as Celery announces them.

A message that is not a task (A24), an invalid one (A26), one whose body
cannot be decoded (A27), a task this worker does not know (A25), and a task
that expired or was revoked (B16, B18) each get Celery's handling: its log
line, the message rejected or acked, a result stored where Celery stores one
(``NotRegistered``, REVOKED), its event and its signal. These are the
`Consumer`'s methods (a mixin), kept apart because each is a small protocol
of its own that a reader looks up by the outcome, not by the loop.

What they use of the consumer: ``broker``, ``store`` (the result store),
``observers`` (consumer/observers.py: events, metrics...), ``revoked`` and
``revoked_stamps``, ``hostname``, and its ``_ack`` / ``_reject_delivery``.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.exceptions import InvalidTaskError, NotRegistered
from celery.utils.saferepr import saferepr
from kombu.exceptions import ContentDisallowed

from celerycompat.consumer.broker import Delivery
from celerycompat.consumer.request import (
    DECODE_ERROR,
    INVALID_TASK,
    UNKNOWN_MESSAGE,
    UNKNOWN_TASK,
    Request,
    UnknownTaskRequest,
    dump_body,
)
from celerycompat.execution.context import build_context, request_dict
from celerycompat.protocol import message as wire

logger = logging.getLogger("celery.worker.consumer.consumer")
request_logger = logging.getLogger("celery.worker.request")


class Announcements:
    """The `Consumer`'s handling of messages it does not run (module docstring)."""

    broker: Any
    store: Any
    observers: Any
    revoked: Any
    revoked_stamps: Any
    hostname: str

    if TYPE_CHECKING:  # the consumer's, used here
        def _ack(self, request: Request) -> None:
            ...

        def _reject_delivery(self, delivery: Delivery, requeue: bool = False) -> None:
            ...

    def _on_unknown_message(self, delivery: Delivery) -> None:
        logger.warning(UNKNOWN_MESSAGE, dump_body(delivery))
        self._reject_delivery(delivery)
        signals.task_rejected.send(sender=self, message=delivery.handle, exc=None)

    def _on_invalid(self, delivery: Delivery, exc: BaseException) -> None:
        if isinstance(exc, wire.InvalidTaskMessage) and not isinstance(exc, ContentDisallowed):
            # Celery's own class for the ``task_rejected`` receivers; same text.
            exc = InvalidTaskError(*exc.args)
        logger.error(INVALID_TASK, exc, dump_body(delivery), exc_info=True)
        self._reject_delivery(delivery)
        signals.task_rejected.send(sender=self, message=delivery.handle, exc=exc)

    def _on_decode_error(self, delivery: Delivery, exc: BaseException) -> None:
        if isinstance(exc, wire.BodyUndecodable) and exc.args:
            exc = exc.args[0]  # log kombu's DecodeError itself, as Celery does
        logger.critical(DECODE_ERROR, exc, delivery.content_type, delivery.content_encoding,
                        saferepr(delivery.headers), dump_body(delivery), exc_info=True)
        if self.broker is not None and delivery.handle is not None:
            try:
                self.broker.ack(delivery)
            except Exception:
                logger.exception("Couldn't ack an undecodable message")

    def _on_unknown_task(self, delivery: Delivery, peeked: wire.Peeked) -> None:
        """A25: reject, store FAILURE NotRegistered, signal ``task_unknown``."""
        name, task_id = peeked.task, peeked.id
        # Celery logs the KeyError of its strategy lookup, so the name is quoted.
        logger.error(UNKNOWN_TASK, KeyError(name), dump_body(delivery), delivery.headers,
                     delivery.delivery_info, exc_info=True)
        self._reject_delivery(delivery)
        request = UnknownTaskRequest(
            name=name, root_id=peeked.root_id,
            correlation_id=delivery.properties.get("correlation_id"),
            reply_to=delivery.properties.get("reply_to"),
        )
        try:
            self.store.mark_as_failure(task_id, NotRegistered(name), None, request,
                                       store_result=True, call_errbacks=True)
        except Exception:
            logger.exception("Could not store NotRegistered for %s", task_id)
        self.observers.unknown(task_id, name)
        signals.task_unknown.send(sender=self, message=delivery.handle, exc=KeyError(name),
                                  name=name, id=task_id)

    def _discarded(self, request: Request, starting: bool = False) -> bool:
        """Expired (B16) or revoked (B18): REVOKED stored, message acked, not run.

        Checked on receipt and again just before the task would start. A
        revoked stamp (``revoke_by_stamped_headers``) is looked for before
        the start, and on receipt only if the message has an expiry: Celery
        checks on receipt only messages that expire or have a revoked id, so
        a task revoked by stamp is received (signal, event) and then discarded.
        """
        message = request.message
        expires = message.expires
        # Celery reports ``expired`` as None for a message that expires later
        # (the value of its ``maybe_expire()``), False when there is no expiry.
        expired = expires is not None and (datetime.now(timezone.utc) > expires or None)
        by_stamp = None
        if expired:
            self.revoked.add(message.id)
        elif message.id not in self.revoked:
            if starting or expires is not None:
                by_stamp = self.revoked_stamps.match(message.stamped_headers, message.stamps)
            if by_stamp is None:
                return False
        if by_stamp is None:
            request_logger.info("Discarding revoked task: %s[%s]", message.name, message.id)
        else:
            request_logger.info("Discarding revoked task: %s[%s] (revoked by header: %s)",
                                message.name, message.id, by_stamp)
        self._announce_revoked(request, "expired" if expired else "revoked", expired=expired)
        return True

    def _announce_revoked(self, request: Request, reason: str, *, terminated: bool = False,
                          signum: int | None = None, expired: Any = False) -> None:
        """Celery's ``Request._announce_revoked``: REVOKED ``reason`` stored, the
        message acked, the ``task-revoked`` event and ``task_revoked`` sent."""
        message = request.message
        context = build_context(message, request_dict(message, hostname=self.hostname,
                                                      loglevel=None, logfile=None))
        ignore = message.ignore_result if message.ignore_result is not None \
            else request.task.ignore_result
        store_errors = (not ignore) or request.task.store_errors_even_if_ignored
        try:
            self.store.mark_as_revoked(message.id, reason, context, store_result=store_errors)
        except Exception:
            logger.exception("Could not store REVOKED for %s", message.id)
        self._ack(request)
        self.observers.revoked(request, terminated=terminated, signum=signum, expired=expired)
        signals.task_revoked.send(sender=request.task, request=context, terminated=terminated,
                                  signum=signum, expired=expired)
