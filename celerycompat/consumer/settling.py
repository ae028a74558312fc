"""Settling: what happens to a message once its task is over (B5, B6).

Outcomes come back from the pool's threads (or prefork's result thread)
through the consumer's ``_done`` queue and are settled on the consumer's
thread, the only one that talks to the broker. `execution.outcome.settle`
decides (ack, reject and drop, requeue) from the outcome and the task's
``acks_late`` / ``acks_on_failure_or_timeout``; this module carries it out.
A SUCCESS whose result is still being written (group commit,
backends/group_commit.py) is settled only when the write has landed: the
slot is freed at once, the ack, the event and the count wait, so a result
always precedes its ack. A request of an older connection (``generation``)
is never acked: the broker already has its message back.

These are the `Consumer`'s methods (a mixin); what they use of it is
listed on `Settling`.
"""

from __future__ import annotations

import logging
import queue
from collections import Counter
from typing import TYPE_CHECKING, Any

from celerycompat.backends.riding_acks import AckTicket
from celerycompat.consumer.broker import Delivery
from celerycompat.consumer.done_queue import DoneQueue
from celerycompat.consumer.request import Request
from celerycompat.execution.outcome import Outcome, Settle, settle

logger = logging.getLogger("celery.worker.consumer.consumer")
request_logger = logging.getLogger("celery.worker.request")

_MISSING = object()


class AckDue:
    """On the ``_done`` queue: a run says the early ack of the request with
    this key (``id(request)``) is due (backends/riding_acks.py, notice
    tickets): the task is still running, so no deferred SUCCESS can be left
    behind the ack."""

    __slots__ = ("key",)

    def __init__(self, key: int) -> None:
        self.key = key


class Settling:
    """The `Consumer`'s settling (module docstring).

    What it uses of the consumer: ``_done`` (outcomes from the pool),
    ``_writing`` (ids whose SUCCESS write is in flight) and
    ``_awaiting_write`` (those requests), ``_waiting`` (requests the pool
    holds ahead of a free slot), ``_noticed`` (requests whose
    run will say when their early ack is due), ``active``,
    ``processed``, ``generation``, ``broker``, ``observers``, ``app`` and
    ``_connection_errors``.
    """

    app: Any
    broker: Any
    generation: int
    active: dict
    _waiting: dict
    processed: int
    observers: Any
    _done: DoneQueue
    _writing: Counter
    _awaiting_write: dict
    _noticed: dict
    _acks_urgent: bool
    _ack_tickets: str | None
    pool: Any

    if TYPE_CHECKING:  # the consumer's, used here
        def _connection_errors(self) -> tuple[type[BaseException], ...]:
            ...

        def _accept(self, request: Request) -> None:
            ...

        def _promote_waiting(self) -> None:
            ...

    def _wait_for_finished(self, timeout: float) -> None:
        try:
            item = self._done.get(timeout=timeout)
        except queue.Empty:
            return
        self._settle_item(item)
        self._settle_finished()

    def _settle_finished(self) -> None:
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                break
            self._settle_item(item)
        if self._acks_urgent:
            # Acks that follow stored results (or early acks a run held
            # back) go now, not with the next fetch: a worker killed in
            # between would run those tasks again (issue 19). One round
            # trip for all of this turn's.
            self._acks_urgent = False
            if self.broker is not None:
                try:
                    self.broker.flush()
                except self._connection_errors() as exc:
                    # Still owed: the next poll meets the same error and the
                    # new connection sends them (`Broker.abandon`/``adopt``).
                    logger.debug("acks not sent now: %r", exc)

    def _settle_item(self, item: Any) -> None:
        """An outcome from a pool, (with its write's future) one whose
        deferred SUCCESS write has just finished, or an `AckDue`."""
        if type(item) is AckDue:
            request = self._noticed.pop(item.key, None)
            if request is not None and request.ack_pending:
                self._ack(request)
                self._acks_urgent = True  # an early ack already held back
        elif len(item) == 3:
            request, outcome, durable = item
            self._writing[request.id] -= 1
            if self._writing[request.id] <= 0:
                del self._writing[request.id]
            self._awaiting_write.pop(id(request), None)
            self._settle_written(request, self._after_write(request, outcome, durable))
            ticket = request.message.ack_ticket
            if ticket is None or ticket.server is None:
                # Not acked with the result (riding_acks.py): ack soon.
                self._acks_urgent = True
        else:
            self._settle(*item)

    def _settle(self, request: Request, outcome: Outcome) -> None:
        self.active.pop(id(request), None)
        if self._waiting.pop(id(request), None) is not None and not request.terminated:
            # Over before a slot was seen to free for it (the pool failed
            # it, or ran it first): started all the same, as Celery's would be.
            self._accept(request)
        self._promote_waiting()
        if request.ack_rides:
            self._noticed.pop(id(request), None)
        if request.terminated:
            # Announced (REVOKED, acked) when it was terminated; now its slot is free.
            self.processed += 1
            return
        if request.ack_pending and not request.ack_rides:
            # solo's early ack, which Celery sends once the task is over.
            request.ack_pending = False
            self._send_ack(request)
        durable = outcome.durable
        if durable is not None:
            # The task is over (its slot is free) but its SUCCESS is still
            # being written (group commit): ack, event and count wait for
            # the write, so a result always precedes its ack.
            outcome.durable = None
            if not durable.done():
                self._writing[request.id] += 1
                self._awaiting_write[id(request)] = request
                done = self._done

                def written(_: Any) -> None:
                    done.put((request, outcome, durable))

                durable.add_done_callback(written)
                return
            outcome = self._after_write(request, outcome, durable)
        self._settle_written(request, outcome)

    def _after_write(self, request: Request, outcome: Outcome, durable: Any) -> Outcome:
        written = outcome.after_write(durable)
        if written is not outcome:
            request_logger.error("Task %s[%s] result could not be stored: %r",
                                 request.name, request.id, written.retval)
        return written

    def _settle_written(self, request: Request, outcome: Outcome) -> None:
        self.processed += 1
        if request.ack_pending:
            # An early ack the run made (riding_acks.py): ours, after the
            # result, makes sure of it (removing a removed tag is a no-op).
            request.ack_pending = False
            self._send_ack(request)
        decision = settle(
            outcome,
            acks_late=request.acks_late,
            acks_on_failure_or_timeout=self._acks_on_failure_or_timeout(request.task),
        )
        if decision is Settle.ACK:
            self._ack(request)
        elif decision is Settle.DROP:
            self._reject(request, requeue=False)
        elif decision is Settle.REQUEUE:
            self._reject(request, requeue=True)
        self.observers.finished(request, outcome, decision)

    def _ticket_for_run(self, request: Request) -> None:
        """Let the run's result store make this message's ack, in the same
        script call as the task's SUCCESS where it can (backends/riding_acks.py):
        the ticket travels with the task to the pool. The consumer's side of
        it is switched when the task starts (`_hand_ack_to_run`).

        An early ack then goes from the run when the task starts (or with its
        SUCCESS, if that comes within a few milliseconds), not from here: the
        consumer's own ack follows once the result is written (``ack_pending``,
        `Settling._settle_written`), so a result is never left deferred
        behind an ack that has landed.
        """
        # Solo: Celery's early ack reaches the broker after the task (B5),
        # so the message stays un-acked while it runs: its ack rides with
        # the SUCCESS as an acks_late one does, or follows the result.
        held = not request.acks_late and not self.pool.runs_inline
        if self._ack_tickets == "ride":
            request.message.ack_ticket = self.broker.ack_ticket(request.delivery, held)
        elif held:
            # The broker's acks are ours to send: the run tells us when the
            # early ack is due (riding_acks.ack_due -> `_ack_due`).
            request.message.ack_ticket = AckTicket(None, 0, "", "", id(request), True)

    def _hand_ack_to_run(self, request: Request) -> None:
        """The task starts with its ticket (`_ticket_for_run`): an early ack is
        now the run's to make, and counted as made."""
        if request.acks_late:
            return
        if not self.pool.runs_inline:
            if self._ack_tickets == "ride":
                self.broker.hand_over(request.delivery)
            else:
                self._noticed[id(request)] = request
        request.acked = request.ack_pending = request.ack_rides = True

    def _ack_due(self, key: int) -> None:
        """From any thread: a run's early ack is due (riding_acks.ack_due)."""
        self._done.put(AckDue(key))

    def _acks_on_failure_or_timeout(self, task: Any) -> bool:
        # A bound task carries the setting; the app's configuration is only
        # read for one that does not (reading it costs more than settling).
        value = getattr(task, "acks_on_failure_or_timeout", _MISSING)
        if value is _MISSING:
            value = self.app.conf.task_acks_on_failure_or_timeout
        return bool(value)

    def _ack(self, request: Request) -> None:
        if request.acked and not request.ack_pending:
            return
        request.acked = True
        request.ack_pending = False
        self._send_ack(request)

    def _send_ack(self, request: Request) -> None:
        if request.generation != self.generation or self.broker is None:
            return  # its connection is gone; the broker has it back already
        try:
            self.broker.ack(request.delivery)
        except self._connection_errors():
            logger.exception("Couldn't ack %r", request.message.id)

    def _reject(self, request: Request, requeue: bool) -> None:
        if request.acked:
            return
        request.acked = True
        if request.generation != self.generation or self.broker is None:
            return
        try:
            self.broker.reject(request.delivery, requeue=requeue)
        except self._connection_errors():
            logger.exception("Couldn't reject %r", request.message.id)

    def _reject_delivery(self, delivery: Delivery, requeue: bool = False) -> None:
        if self.broker is None:
            return
        try:
            self.broker.reject(delivery, requeue=requeue)
        except self._connection_errors():
            logger.exception("Couldn't reject a message")
