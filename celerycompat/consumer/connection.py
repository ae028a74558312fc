"""The consumer's connection: connect, retry, lose it, reconnect.

Celery's policy, in one place: ``broker_connection_retry_on_startup`` /
``broker_connection_retry`` say whether to retry, kombu's backoff how
(``broker_connection_max_retries`` how often), and giving up stops the
worker with exit code 1 after Celery's critical line. A lost connection is
abandoned without a word to the broker (a close handshake on a half-open
socket would block, Celery #9705), the requests held for it are dropped
(the broker has their messages back), the pidbox, gossip and the event
connection are let go, and a new connection is made; on native Redis the
new adapter adopts what the lost one still owed (`Broker.abandon` /
``adopt``), so a running task's message is not restored and run twice.
Shutdown lets go of the connection too: warm, the held messages go back
(``stop_consuming``); cold, copies of the running early-acked ones are
published (``return_running``).

These are the `Consumer`'s methods (a mixin, as consumer/announce.py's):
what they use of it is listed on `ConnectionLifecycle`.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable

from kombu.exceptions import OperationalError

from celerycompat.celery_release import setting as release_setting
from celerycompat.consumer.broker import Broker, ConnectStopped
from celerycompat.consumer.liveness import break_sockets, kombu_sockets
from celerycompat.control.mingle import COMPATIBLE_TRANSPORTS

logger = logging.getLogger("celery.worker.consumer.consumer")
worker_logger = logging.getLogger("celery.worker.worker")

#: Celery's warning when the connection is lost (``%s (%r)`` with the error).
CONNECTION_RETRY = ("consumer: Connection to broker lost. "
                    "Trying to re-establish the connection...")


class _GaveUp(Exception):
    """The broker is not retried any more; the reason is already logged."""


class _SetupLost(Exception):
    """Connected, then lost while declaring and consuming; ``__cause__`` says how."""


def _abandon(broker: Any) -> Any:
    """``broker.abandon()``: release a lost connection without a word to the broker;
    returns what it still owed (native Redis), or None."""
    try:
        return broker.abandon()
    except Exception:
        logger.debug("error while abandoning the lost connection", exc_info=True)
        return None


class ConnectionLifecycle:
    """The `Consumer`'s connection handling (module docstring).

    What it uses of the consumer: the settings (``app``), ``broker_factory``
    and ``broker``, ``generation`` (bumped per connection: requests of an
    older one are not acked), ``purge``, ``queues``, ``should_stop`` and
    ``exitcode``, the parts restarted per connection (``observers``,
    ``control``, ``mingle``, ``dispatcher``), the held requests
    it drops (``reserved``, ``_eta``, ``rate_limits``) and the running ones
    it hands over (``active``, and ``_awaiting_write``: finished, their
    SUCCESS still being written), ``store`` (whether acks can ride with its
    writes: ``_ack_tickets``), the shutdown's ``stop_consuming`` and
    ``return_running``, and ``on_delivery``, ``_qos_value``,
    ``_fetch_room``, ``disable_prefetch``, ``_cancel_unackable``.
    """

    app: Any
    broker_factory: Callable[[], Broker]
    broker: Broker | None
    generation: int
    purge: bool
    queues: list
    should_stop: bool
    exitcode: int | None
    observers: Any
    control: Any
    mingle: Any
    dispatcher: Any
    reserved: Any
    _eta: list
    rate_limits: Any
    active: dict
    _awaiting_write: dict
    store: Any
    _ack_tickets: str | None
    disable_prefetch: bool

    if TYPE_CHECKING:  # the consumer's, used here
        def on_delivery(self, delivery: Any) -> None:
            ...

        def _qos_value(self) -> int:
            ...

        def _fetch_room(self) -> int | None:
            ...

        def _cancel_unackable(self) -> None:
            ...

        def _ack(self, request: Any) -> None:
            ...

        def _reject(self, request: Any, requeue: bool) -> None:
            ...

        def take_back_waiting(self) -> list[Any]:
            ...

    def connect(self, first: bool = False) -> None:
        """Connect, declare and start consuming; called at start and after a loss.

        Retries as Celery's consumer does: ``broker_connection_retry_on_startup``
        (``first``, when set) or ``broker_connection_retry`` say whether to,
        ``broker_connection_max_retries`` how often. Raises `_GaveUp` (after
        Celery's critical line) when the worker must stop, `ConnectStopped`
        when a shutdown came during the wait, `_SetupLost` when the
        connection was lost again while consuming was being set up.
        """
        self.generation += 1
        broker = self.broker_factory()
        conf = self.app.conf
        setting = "broker_connection_retry_on_startup" \
            if first and release_setting(conf, "broker_connection_retry_on_startup") is not None \
            else "broker_connection_retry"
        retry = bool(conf[setting])
        try:
            broker.connect(retry=retry, max_retries=conf.broker_connection_max_retries,
                           should_stop=lambda: self.should_stop)
        except ConnectStopped:
            raise
        except OperationalError as exc:  # retries used up: Celery's worker crashes
            worker_logger.critical("Unrecoverable error: %r", exc, exc_info=True)
            raise _GaveUp() from exc
        except Exception as exc:
            if retry:
                raise
            logger.critical(
                "Retrying to %s a connection to the message broker after a connection "
                "loss has been disabled (app.conf.%s=False). Shutting down...",
                "establish" if first else "re-establish", setting)
            raise _GaveUp() from exc
        logger.info("Connected to %s", broker.url_for_log)
        errors = tuple(broker.connection_errors) or (OSError,)
        try:
            if self.purge:
                count = broker.purge(self.queues)
                self.purge = False
                nq = len(self.queues)
                print(f"Purged {count} {'message' if count == 1 else 'messages'} from "
                      f"{nq} known task {'queue' if nq == 1 else 'queues'}.", flush=True)
            broker.set_prefetch(self._qos_value())
            if self.disable_prefetch:
                broker.limit_fetch(self._fetch_room())
            broker.consume(self.queues, self.on_delivery)
            self.broker = broker
            carries = getattr(self.store, "carries_acks_from", None)
            if carries is not None and carries(broker.ack_server):
                self._ack_tickets = "ride"
            elif broker.ack_server is not None and getattr(self.store, "defers_success", False):
                # Native Redis path, results elsewhere. Not on RabbitMQ: a
                # held early ack is lost with its channel and the task runs
                # again (measured: more duplicates than Celery after
                # connection closes); Redis tags outlive connections.
                self._ack_tickets = "notice"
            else:
                self._ack_tickets = None
            # Gossip, native delayed delivery and the project's consumer
            # steps (project_steps.py) start here; a connection error in them is
            # a connection lost while setting up, as in Celery.
            self.observers.connected(broker)
        except errors as exc:
            self.broker = None
            _abandon(broker)
            raise _SetupLost(exc) from exc
        if self.control is not None:
            self.control.start(broker.connection)
        if self.mingle is not None and broker.driver_type in COMPATIBLE_TRANSPORTS:
            self.mingle.begin()

    def _establish(self, first: bool, owed: Any = None) -> bool:
        """Connect until it works, a shutdown comes, or retrying is over.

        ``owed``: what the lost connection's adapter still owed the broker
        (`Broker.abandon`); the new adapter settles it (``adopt``, native
        Redis: delivery tags outlive connections there).
        """
        while not self.should_stop:
            try:
                self.connect(first=first)
            except ConnectStopped:
                return False
            except _GaveUp:
                self._give_up()
                return False
            except _SetupLost as lost:
                first = False
                logger.warning("%s (%r)", CONNECTION_RETRY, lost.__cause__)
                if not self.app.conf.broker_connection_retry:
                    logger.critical(
                        "Retrying to re-establish a connection to the message broker after a "
                        "connection loss has been disabled (app.conf.broker_connection_retry"
                        "=False). Shutting down...")
                    self._give_up()
                    return False
                time.sleep(1.0)  # the broker flaps: do not spin
                continue
            self._adopt(owed)
            return True
        return False

    def _adopt(self, owed: Any) -> None:
        """Hand what the lost connection still owed to the new one (native Redis).

        Running tasks whose message was never acked keep it: the new adapter
        leases it and acks it when they end, instead of it being restored
        after ``visibility_timeout`` and run twice. Messages dropped with
        the connection (reserved, ETA, rate-limited) go back to their queue
        at once instead of after ``visibility_timeout``.
        """
        if owed is None or self.broker is None:
            return
        # A task whose SUCCESS is still being written is over, but its
        # message is not settled: restored now, it would run a second time
        # right after its result landed (issue 19, item 2).
        running = [request for request in [*self.active.values(),
                                           *self._awaiting_write.values()]
                   if not request.acked or request.ack_pending]
        try:
            kept = self.broker.adopt(owed, [request.delivery for request in running])
        except self._connection_errors():
            logger.warning("Could not settle what the lost connection owed; those "
                           "messages come back after visibility_timeout", exc_info=True)
            return
        for request in running:
            if request.delivery.handle.delivery_tag in kept:
                request.generation = self.generation

    def stop_consuming(self) -> None:
        """Warm shutdown: no new deliveries; reserved and held messages go back (G9).

        Deliveries stop first, or the broker would hand the returned
        messages straight back to this worker.
        """
        self.should_stop = True
        if self.broker is not None:
            try:
                self.broker.cancel()
            except self._connection_errors():
                pass
        dropped = self.take_back_waiting() + list(self.reserved) \
            + [entry[2] for entry in self._eta]
        if self.rate_limits is not None:
            dropped += self.rate_limits.clear()
        self.reserved.clear()
        self._eta.clear()
        for request in dropped:
            self._reject(request, requeue=True)

    def return_running(self) -> None:
        """Cold shutdown: running tasks will not finish here; their messages go back.

        acks_late messages were never acked and return with the connection.
        Early-acked ones are gone from the broker, so a copy is published
        where the original was sent: the task runs again elsewhere
        (at-least-once) instead of vanishing (Celery stores RETRY and never
        runs it, B37).
        """
        if self.broker is None:
            return
        for request in list(self.active.values()):
            if request.ack_rides and not request.terminated:
                # Acked by its run, or about to be: ack it here too, so the
                # copy below is the only one left.
                self._ack(request)
            if not request.acked or request.ack_pending or request.terminated:
                continue
            try:
                self.broker.republish(request.delivery)
                logger.warning("Cold shutdown: task %s[%s] was running; its message was "
                               "returned to the queue", request.name, request.id)
            except Exception:
                logger.exception("Cold shutdown: could not return task %s[%s] to the queue",
                                 request.name, request.id)

    def _give_up(self) -> None:
        """No more retrying: the worker stops (warm) and exits with 1, as Celery's."""
        self.exitcode = 1
        self.should_stop = True

    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        errors = self.broker.connection_errors if self.broker is not None else ()
        return tuple(errors) or (OSError,)

    def _on_connection_lost(self, exc: BaseException) -> None:
        """Drop the connection without talking to it, then reconnect (or stop).

        The lost connection is abandoned first (its sockets shut, nothing
        sent: a close handshake on a half-open connection would block, Celery
        #9705); only then are the pidbox and the held requests let go.
        """
        logger.warning("%s (%r)", CONNECTION_RETRY, exc)
        logger.debug("Connection error: %r", exc, exc_info=exc)
        broker, self.broker = self.broker, None
        owed = _abandon(broker) if broker is not None else None
        self.observers.disconnected()
        # Un-acked messages go back to the broker with the connection; the
        # copies held here can no longer be acked, so they are dropped (B36),
        # with those the pool held ahead of a free slot (not started either).
        # Taken back first: one a child took meanwhile is running, and is
        # cancelled below with the others.
        self.take_back_waiting()
        if owed is None and self.app.conf.get(
                "worker_cancel_long_running_tasks_on_connection_loss"):
            self._cancel_unackable()
        self.reserved.clear()
        self._eta.clear()
        if self.rate_limits is not None:
            self.rate_limits.clear()
        if self.control is not None:
            self.control.stop()
        if self.dispatcher is not None:
            # The event connection goes to the same broker and is rebuilt with
            # the rest, as Celery's Events step is: left alone it could be
            # half-open too, and the next event would wait on it.
            self._break_event_connection()
            self.dispatcher.close()
        if not self.app.conf.broker_connection_retry:
            logger.critical(
                "Retrying to re-establish a connection to the message broker after a "
                "connection loss has been disabled (app.conf.broker_connection_retry=False). "
                "Shutting down...")
            self._give_up()
            return
        self._establish(first=False, owed=owed)

    def _break_event_connection(self) -> None:
        # The dispatcher's own connection; it reconnects after a failed publish.
        break_sockets(kombu_sockets(getattr(self.dispatcher, "_connection", None)))
