"""What remote control and ``inspect`` ask of the consumer.

The pidbox commands (control/commands.py) and ``--autoscale`` reach the
consumer only through these methods: queues added and cancelled at run time
(``add_consumer`` / ``cancel_consumer``), a running task terminated
(``revoke(terminate=True)``) or cancelled on a connection loss, the pool
resized, and the read-only views ``inspect active / reserved / scheduled /
stats`` report. They run on the consumer's thread (the pidbox is polled
there), so they read its state without locks.

These are the `Consumer`'s methods (a mixin); what they use of it is
listed on `ConsumerControls`.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING, Any

from celery import signals
from celery.exceptions import Retry

from celerycompat.celery_release import cancels_on_cold_shutdown
from celerycompat.consumer.request import CANCELLED_ON_CONNECTION_LOSS, Request
from celerycompat.execution.context import build_context, request_dict

logger = logging.getLogger("celery.worker.consumer.consumer")


class ConsumerControls:
    """The `Consumer`'s interface for remote control and inspect (module docstring).

    What it uses of the consumer: ``app``, ``queues``, ``broker``, ``pool``,
    ``store``, ``hostname``, ``observers``, the requests (``active``,
    ``_waiting``, ``reserved``, ``_eta``, ``rate_limits``, ``_writing``) and
    ``_announce_revoked``, ``_update_prefetch``, ``_promote_waiting``,
    ``take_back_waiting``.
    """

    app: Any
    queues: list
    broker: Any
    pool: Any
    store: Any
    hostname: str
    observers: Any
    active: dict
    _waiting: dict
    reserved: Any
    _eta: list
    rate_limits: Any
    _writing: Any

    if TYPE_CHECKING:  # the consumer's, used here
        def _announce_revoked(self, request: Request, reason: str, **kwargs: Any) -> None:
            ...

        def _update_prefetch(self) -> None:
            ...

        def _promote_waiting(self) -> None:
            ...

        def take_back_waiting(self) -> list[Request]:
            ...

    def revoked_updated(self) -> None:
        """Revoked ids or stamps were added: requests waiting in the pool go
        back to the front of ``reserved``, where a slot taking them discards
        the revoked ones, as it does any reserved request (B17; Celery's
        pool would run them: docs/compat.md)."""
        self.reserved.extendleft(reversed(self.take_back_waiting()))

    def add_task_queue(self, name: str, exchange: str | None = None,
                       exchange_type: str | None = None, routing_key: str | None = None,
                       **options: Any) -> None:
        """Consume from one more queue: a known one, or a new one declared as Celery does."""
        if any(queue.name == name for queue in self.queues):
            return
        queues = self.app.amqp.queues
        if name in queues:  # ``in``: indexing would create a missing queue
            queue = queues[name]
        else:
            queue = queues.select_add(
                name, exchange=name if exchange is None else exchange,
                exchange_type=exchange_type or "direct", routing_key=routing_key, **options)
        self.queues.append(queue)
        if self.broker is not None:
            self.broker.add_queue(queue)
        logger.info("Started consuming from %s", name)

    def cancel_task_queue(self, name: str) -> None:
        logger.info("Canceling queue %s", name)
        try:
            self.app.amqp.queues.deselect(name)
        except KeyError:
            pass
        self.queues = [queue for queue in self.queues if queue.name != name]
        if self.broker is not None:
            self.broker.cancel_queue(name)

    def terminate(self, request: Request, signum: int) -> bool:
        """``revoke(terminate=True)`` of a running request: Celery's
        ``Request.terminate`` + ``_announce_revoked``.

        The pool ends the run (prefork: ``signum`` to the child) and reports
        it later; what clients see is announced now, as Celery's main process
        does: REVOKED ``terminated`` stored, the message acked, the
        ``task-revoked`` event (``terminated``, ``signum``) and
        ``task_revoked``. The slot stays taken until the pool reports; that
        report is then dropped. False if the pool cannot end it (solo; a run
        already writing its result).
        """
        if request.terminated:
            return True
        if self.active.get(id(request)) is not request \
                or not self.pool.terminate(request.id, signum):
            return False
        request.terminated = True
        self._announce_revoked(request, "terminated", terminated=True, signum=signum)
        return True

    def _cancel_unackable(self) -> None:
        """``worker_cancel_long_running_tasks_on_connection_loss``: Celery's
        ``Request.cancel`` for each running late-acked task whose message went
        back with the lost connection (it will run again from there).

        The pool ends the run (as ``terminate`` with SIGTERM) and its report
        is dropped; RETRY ``cancelled by Celery`` is stored, ``on_retry``,
        ``task_retry`` and the ``task-cancelled`` event follow, and nothing is
        acked. Not called when the broker adapter carried the messages over
        to the next connection (native Redis): they are not redelivered, so
        the runs go on and are acked there.

        Called once the pool's waiting jobs are taken back: a request still
        waiting is one a child took meanwhile (it starts), so it is
        cancelled too.
        """
        for request in list(self.active.values()):
            if not request.acks_late or request.acked or request.terminated:
                continue
            message = request.message
            logger.warning(CANCELLED_ON_CONNECTION_LOSS, f"<Request: {message.name}"
                           f"[{message.id}] {message.argsrepr} {message.kwargsrepr}>")
            try:
                ended = self.pool.terminate(message.id, signal.SIGTERM)
            except Exception:
                logger.warning("Failed to cancel active request %r after connection loss",
                               request.id, exc_info=True)
                continue
            if not ended:  # solo: the run is this very thread
                logger.warning("Failed to cancel active request %r after connection loss",
                               request.id)
                continue
            request.terminated = True
            self._announce_cancelled(request)

    def cancel_on_cold_shutdown(self) -> None:
        """A cold shutdown ends the running tasks: each one Celery cancels
        (>= 5.5: not ``acks_late``, or ``acks_late`` and not acked yet) gets
        its ``task-cancelled`` event, so a monitor shows it cancelled here
        (Flower: CANCELLED) instead of started for ever.

        Only the event: Celery also stores RETRY ``cancelled by Celery`` for
        an early-acked one, which nothing then runs again (B37); ccworker
        returns its message to the queue instead (`return_running`), and an
        ``acks_late`` one goes back with the connection, as in Celery.
        """
        if not cancels_on_cold_shutdown():
            return
        for request in list(self.active.values()):
            if id(request) in self._waiting or request.terminated:
                continue  # never started, or ended by a revoke already
            if request.acks_late and request.acked:
                continue  # Celery lets an acked one finish
            self.observers.cancelled(request)

    def _announce_cancelled(self, request: Request) -> None:
        message = request.message
        context = build_context(message, request_dict(message, hostname=self.hostname,
                                                      loglevel=None, logfile=None))
        reason = Retry(message="cancelled by Celery")
        try:
            self.store.mark_as_retry(message.id, reason, None, context)
        except Exception:
            logger.exception("Could not store RETRY for %s", message.id)
        self.observers.cancelled(request)
        try:
            request.task.on_retry(reason, message.id, message.args, message.kwargs, None)
        except Exception:
            logger.exception("Task %s[%s] on_retry handler raised", message.name, message.id)
        signals.task_retry.send(sender=request.task, request=context, einfo=None)

    def pool_resized(self) -> None:
        """The pool's slot count changed (``pool_grow``/``pool_shrink``, autoscale):
        the consumer starts tasks up to the new ``limit``, and the prefetch count is
        ``limit`` (at least 1) x multiplier again (with --autoscale: ``max`` x
        multiplier). Celery's instead adds each change to the count it had, and
        skips changes that leave no process, so after a failed or total shrink
        its count no longer matches its pool (docs/compat.md)."""
        self._update_prefetch()
        self._promote_waiting()

    def results_in_flight(self) -> set[str]:
        """Ids of finished tasks whose SUCCESS write (group commit) has not
        landed yet. Celery writes before it reads another control message,
        so to a ``revoke`` these are already SUCCESS, never to be marked
        REVOKED (a read in between would see PENDING)."""
        return set(self._writing)

    def active_requests(self) -> list[Request]:
        """Running requests; a terminated one is no longer listed (Celery's
        ``task_ready``), nor one waiting in the pool for a slot."""
        waiting = self._waiting
        return [request for request in self.active.values()
                if not request.terminated and id(request) not in waiting]

    def reserved_requests(self) -> list[Request]:
        """Prefetched and not started: those waiting in the pool first."""
        return [*self._waiting.values(), *self.reserved]

    def scheduled_requests(self) -> list[Request]:
        return [entry[2] for entry in sorted(self._eta)]

    def rate_limited_requests(self) -> list[Request]:
        """Requests waiting for a rate-limit token.

        Celery lists them in no ``inspect`` reply (neither reserved nor
        scheduled); only ``query_task`` finds those that had an ETA, as
        ``scheduled``.
        """
        return self.rate_limits.waiting() if self.rate_limits is not None else []

    def broker_info(self) -> dict[str, Any]:
        """The ``broker`` section of ``inspect stats``: kombu's info, never the password."""
        if self.broker is None:
            return {}
        info = dict(self.broker.connection.info())
        info.pop("password", None)
        return info
