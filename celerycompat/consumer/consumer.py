"""The consumer: deliveries in, requests to the pool, settled messages out.

One thread (the worker's main thread) runs `Consumer.run`. It alone talks
to the broker: it polls for deliveries, turns each into a `Request` (or one of
Celery's outcomes for a message it cannot run, A24-A27), holds requests until
a pool slot is free, acknowledges early-ack tasks as they start (B5), and
settles acks_late messages when their outcome comes back from a pool thread
through a queue (B6). Prefetch is Celery's: ``concurrency *
worker_prefetch_multiplier`` un-acked messages at most (B34).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from celery import signals
from celery.exceptions import NotRegistered
from celery.utils.collections import LimitedSet
from celery.utils.saferepr import saferepr
from kombu.exceptions import ContentDisallowed

from celerycompat.consumer.broker import Broker, Delivery
from celerycompat.control.mingle import COMPATIBLE_TRANSPORTS, Mingle
from celerycompat.events.dispatcher import EventDispatcher
from celerycompat.events.heartbeat import Heart
from celerycompat.events.task_events import TaskEvents
from celerycompat.execution.context import build_context, request_dict
from celerycompat.execution.outcome import Outcome, Settle, settle
from celerycompat.pools.base import Pool
from celerycompat.protocol import message as wire

logger = logging.getLogger("celery.worker.consumer.consumer")
strategy_logger = logging.getLogger("celery.worker.strategy")
request_logger = logging.getLogger("celery.worker.request")

UNKNOWN_MESSAGE = (
    "Received and deleted unknown message.  Wrong destination?!?\n\n"
    "The full contents of the message body was: %s\n"
)
UNKNOWN_TASK = (
    "Received unregistered task of type %s.\n"
    "The message has been ignored and discarded.\n\n"
    "Did you remember to import the module containing this task?\n"
    "Or maybe you're using relative imports?\n\n"
    "Please see\nhttps://docs.celeryq.dev/en/latest/internals/protocol.html\n"
    "for more information.\n\n"
    "The full contents of the message body was:\n%s\n\n"
    "The full contents of the message headers:\n%s\n\n"
    "The delivery info for this task is:\n%s\n"
)
INVALID_TASK = (
    "Received invalid task message: %s\n"
    "The message has been ignored and discarded.\n\n"
    "Please ensure your message conforms to the task\n"
    "message protocol as described here:\n"
    "https://docs.celeryq.dev/en/latest/internals/protocol.html\n\n"
    "The full contents of the message body was:\n%s\n"
)
DECODE_ERROR = (
    "Can't decode message body: %r [type:%r encoding:%r headers:%s]\n\nbody: %s\n"
)


def dump_body(delivery: Delivery) -> str:
    """The body as Celery shows it in these log lines: a bounded repr and its size."""
    body = delivery.body or b""
    return f"{saferepr(body, 1024)} ({len(body)}b)"


@dataclass
class Request:
    """A task message the worker accepted and will run (or hold until its ETA)."""

    delivery: Delivery
    message: wire.TaskMessage
    task: Any
    generation: int
    acked: bool = False
    ack_pending: bool = False
    """Counted as acked, but the broker ack is sent once the task is over (solo)."""
    time_start: float | None = None
    context: Any = field(default=None, repr=False)
    pid_lookup: Callable[[str], Any] | None = field(default=None, repr=False)
    """``pool.pid_for``, set when the request starts (``worker_pid`` in info)."""

    @property
    def acks_late(self) -> bool:
        return bool(self.task.acks_late)

    # The read-only surface of Celery's worker Request that ``task_received``
    # receivers use (``request.id``, ``request.name``, ``request.args``...).

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def name(self) -> str:
        return self.message.name

    @property
    def type(self) -> str:
        return self.message.task

    @property
    def args(self) -> Any:
        return self.message.args

    @property
    def kwargs(self) -> Any:
        return self.message.kwargs

    @property
    def argsrepr(self) -> str:
        return self.message.argsrepr

    @property
    def kwargsrepr(self) -> str:
        return self.message.kwargsrepr

    @property
    def eta(self) -> Any:
        return self.message.eta

    @property
    def expires(self) -> Any:
        return self.message.expires

    @property
    def root_id(self) -> Any:
        return self.message.root_id

    @property
    def parent_id(self) -> Any:
        return self.message.parent_id

    @property
    def delivery_info(self) -> dict[str, Any]:
        return self.message.delivery_info

    @property
    def request_dict(self) -> dict[str, Any]:
        return self.message.request

    @property
    def hostname(self) -> Any:
        return self.message.request.get("hostname")

    def info(self, safe: bool = False) -> dict[str, Any]:
        """The request-info dict of ``inspect active/reserved/scheduled`` (F9)."""
        message = self.message
        return {
            "id": message.id,
            "name": message.name,
            "args": message.argsrepr if safe else message.args,
            "kwargs": message.kwargsrepr if safe else message.kwargs,
            "type": message.task,
            "hostname": self.hostname,
            "time_start": self.time_start,
            "acknowledged": self.acked,
            "delivery_info": message.delivery_info,
            "worker_pid": self.pid_lookup(message.id)
            if self.time_start is not None and self.pid_lookup is not None else None,
        }


class Consumer:
    """The consumer loop. See the module docstring for what it owns."""

    def __init__(self, *, app: Any, broker_factory: Callable[[], Broker], pool: Pool,
                 store: Any, queues: Sequence[Any],
                 decode: wire.Decoder, hostname: str, prefetch_multiplier: int,
                 purge: bool = False, dispatcher: EventDispatcher | None = None,
                 heartbeat_interval: float | None = None,
                 control: Callable[[Consumer], Any] | None = None,
                 mingle: bool = False) -> None:
        self.app = app
        self.broker_factory = broker_factory
        self.broker: Broker | None = None
        self.pool = pool
        self.store = store
        self.queues = list(queues)
        self.decode = decode
        self.hostname = hostname
        self.prefetch_multiplier = max(0, int(prefetch_multiplier))
        self.purge = purge
        self.generation = 0
        self.reserved: deque[Request] = deque()
        self.active: dict[int, Request] = {}
        self._eta: list[tuple[float, int, Request]] = []
        self._seq = itertools.count()
        self._done: queue.SimpleQueue[tuple[Request, Outcome]] = queue.SimpleQueue()
        self.should_stop = False
        self.processed = 0
        #: Tasks accepted by name (``inspect stats`` ``total``).
        self.total_count: Counter[str] = Counter()
        #: Revoked task ids (B17): bounded, entries expire once the set is full.
        self.revoked = LimitedSet(
            maxlen=int(os.environ.get("CELERY_WORKER_REVOKES_MAX", 50000)),
            expires=float(os.environ.get("CELERY_WORKER_REVOKE_EXPIRES", 10800)))
        #: The pidbox node (built by ``control(self)``), restarted on every connection.
        self.control = control(self) if control is not None else None
        self.mingle = Mingle(app, hostname, self.revoked) if mingle else None
        self.dispatcher = dispatcher
        self.events = TaskEvents(dispatcher) if dispatcher is not None else None
        self.heart = Heart(dispatcher, interval=heartbeat_interval,
                           active=lambda: len(self.active), processed=lambda: self.processed) \
            if dispatcher is not None and heartbeat_interval else None
        self._worker_utc = app.uses_utc_timezone()
        self._worker_tz = app.timezone

    # -- connection ------------------------------------------------------------

    @property
    def prefetch_count(self) -> int:
        """Celery's count: slots x multiplier, plus one per held ETA task (B12, B34)."""
        if not self.prefetch_multiplier:
            return 0
        return self.pool.limit * self.prefetch_multiplier + len(self._eta)

    def connect(self) -> None:
        """Connect, declare and start consuming; called at start and after a loss."""
        self.generation += 1
        broker = self.broker_factory()
        broker.connect()
        logger.info("Connected to %s", broker.url_for_log)
        if self.purge:
            count = broker.purge(self.queues)
            self.purge = False
            nq = len(self.queues)
            print(f"Purged {count} {'message' if count == 1 else 'messages'} from "
                  f"{nq} known task {'queue' if nq == 1 else 'queues'}.", flush=True)
        broker.set_prefetch(self.prefetch_count)
        broker.consume(self.queues, self.on_delivery)
        self.broker = broker
        if self.control is not None:
            self.control.start(broker.connection)
        if self.mingle is not None and broker.connection.transport.driver_type in \
                COMPATIBLE_TRANSPORTS:
            self.mingle.begin()

    # -- the loop ----------------------------------------------------------------

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Consume until `should_stop`; then stop consuming (running tasks go on)."""
        self.connect()
        if self.heart is not None:
            self.heart.start()
        if on_ready is not None:
            on_ready()
        while not self.should_stop:
            try:
                self._cycle()
            except self._connection_errors() as exc:
                if self.should_stop:
                    break
                self._on_connection_lost(exc)

    def _connection_errors(self) -> tuple[type[BaseException], ...]:
        errors = getattr(self.broker, "connection_errors", ())
        return tuple(errors) or (OSError,)

    def _cycle(self) -> None:
        assert self.broker is not None
        self._settle_finished()
        self._release_due_eta()
        self._start_reserved()
        if self.reserved and self._free_slots() == 0:
            # Nothing can start until a slot frees: wait for that instead of
            # the broker, but still let deliveries in (prefetch).
            self._wait_for_finished(0.05)
            self.broker.poll(0)
        else:
            self.broker.poll(self._poll_timeout())
        self._events_tick()

    def _events_tick(self) -> None:
        """Heartbeat when due; send this turn's task events as one batch (E2)."""
        if self.heart is not None:
            self.heart.tick()
        if self.dispatcher is not None:
            self.dispatcher.flush()

    def _poll_timeout(self) -> float:
        timeout = 0.05 if self.active else 0.5
        if self._eta:
            timeout = max(0.0, min(timeout, self._eta[0][0] - time.time()))
        if self.heart is not None:
            timeout = min(timeout, self.heart.seconds_to_next())
        if self.mingle is not None and not self.mingle.done:
            timeout = min(timeout, 0.05)
        return timeout

    def _on_connection_lost(self, exc: BaseException) -> None:
        logger.warning(
            "consumer: Connection to broker lost. Trying to re-establish the connection...",
            exc_info=True,
        )
        # Un-acked messages go back to the broker with the connection; the
        # copies held here can no longer be acked, so they are dropped (B36).
        self.reserved.clear()
        self._eta.clear()
        if self.control is not None:
            self.control.stop()
        try:
            assert self.broker is not None
            self.broker.close()
        except Exception:  # the connection is already gone
            pass
        self.broker = None
        while not self.should_stop:
            try:
                self.connect()
                return
            except self._connection_errors() as again:
                logger.error("consumer: Cannot connect: %s. Trying again in 2 seconds...", again)
                time.sleep(2.0)

    # -- deliveries --------------------------------------------------------------

    def on_delivery(self, delivery: Delivery) -> None:
        """Everything that happens to a message on arrival, in Celery's order."""
        if self.should_stop and delivery.handle is not None and self.broker is not None:
            # Arrived after deliveries were cancelled (in flight): give it back.
            self._reject_delivery(delivery, requeue=True)
            return
        if delivery.decode_error is not None:
            return self._on_decode_error(delivery, delivery.decode_error)
        try:
            peeked = wire.peek(delivery.headers, delivery.body, delivery.content_type,
                               delivery.content_encoding, self.decode)
        except wire.UnknownMessage:
            return self._on_unknown_message(delivery)
        except wire.BodyUndecodable as exc:
            return self._on_decode_error(delivery, exc)
        except (wire.InvalidTaskMessage, ContentDisallowed) as exc:
            return self._on_invalid(delivery, exc)
        task = self.app.tasks.get(peeked.task)
        if task is None:
            return self._on_unknown_task(delivery, peeked)
        try:
            message = wire.parse(
                peeked, delivery.headers, delivery.properties, delivery.delivery_info,
                delivery.body, delivery.content_type, delivery.content_encoding,
                self.decode, worker_utc=self._worker_utc, worker_tz=self._worker_tz,
                saferepr=saferepr,
            )
        except (wire.InvalidTaskMessage, ContentDisallowed) as exc:
            return self._on_invalid(delivery, exc)
        except wire.BodyUndecodable as exc:
            return self._on_decode_error(delivery, exc)
        message.request["hostname"] = self.hostname
        request = Request(delivery, message, task, self.generation)
        self._on_task(request)

    def _on_task(self, request: Request) -> None:
        message = request.message
        if strategy_logger.isEnabledFor(logging.INFO):
            data = {"id": message.id, "name": message.name, "args": message.argsrepr,
                    "kwargs": message.kwargsrepr, "eta": message.eta}
            strategy_logger.info("Task %(name)s[%(id)s] received", data, extra={"data": data})
        if self._discarded(request):
            return
        signals.task_received.send(sender=self, request=request)
        if self.events is not None:
            self.events.received(request)
        if message.eta is not None:
            eta = message.eta.timestamp()
            if eta > time.time():
                heapq.heappush(self._eta, (eta, next(self._seq), request))
                self._update_prefetch()
                return
        self.reserved.append(request)

    def _update_prefetch(self) -> None:
        if self.broker is not None:
            self.broker.set_prefetch(self.prefetch_count)

    def _release_due_eta(self) -> None:
        if not self._eta:
            return
        now = time.time()
        released = False
        while self._eta and self._eta[0][0] <= now:
            _, _, request = heapq.heappop(self._eta)
            if request.generation == self.generation:
                self.reserved.append(request)
            released = True
        if released:
            self._update_prefetch()

    # -- running -----------------------------------------------------------------

    def _free_slots(self) -> int:
        return self.pool.limit - len(self.active)

    def _start_reserved(self) -> None:
        if self.mingle is not None and not self.mingle.done:
            # Peers' revoked ids are not merged yet: nothing starts before.
            self.mingle.poll()
            if not self.mingle.done:
                return
        while self.reserved and self._free_slots() > 0 and not self.should_stop:
            request = self.reserved.popleft()
            if request.generation != self.generation or self._discarded(request):
                continue
            self._start(request)

    def _start(self, request: Request) -> None:
        """Accept: record active, ack early-ack tasks, hand to the pool (B5)."""
        request.time_start = time.time()
        request.pid_lookup = self.pool.pid_for
        self.active[id(request)] = request
        self.total_count[request.message.name] += 1
        if not request.acks_late:
            if self.pool.runs_inline:
                # Celery queues the early ack for its next loop turn, which a
                # solo pool reaches only after the task: the message stays
                # un-acked (and is redelivered if the worker dies) meanwhile.
                request.acked = request.ack_pending = True
            else:
                self._ack(request)
        if self.events is not None:
            self.events.started(request)
        done = self._done
        self.pool.apply(request.message.task, request.message,
                        lambda outcome: done.put((request, outcome)))
        if self.pool.runs_inline:
            self._settle_finished()

    def _wait_for_finished(self, timeout: float) -> None:
        try:
            item = self._done.get(timeout=timeout)
        except queue.Empty:
            return
        self._settle(*item)
        self._settle_finished()

    def _settle_finished(self) -> None:
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return
            self._settle(*item)

    def _settle(self, request: Request, outcome: Outcome) -> None:
        self.active.pop(id(request), None)
        self.processed += 1
        if request.ack_pending:
            request.ack_pending = False
            self._send_ack(request)
        decision = settle(
            outcome,
            acks_late=request.acks_late,
            acks_on_failure_or_timeout=bool(
                getattr(request.task, "acks_on_failure_or_timeout",
                        self.app.conf.task_acks_on_failure_or_timeout)),
        )
        if decision is Settle.ACK:
            self._ack(request)
        elif decision is Settle.DROP:
            self._reject(request, requeue=False)
        elif decision is Settle.REQUEUE:
            self._reject(request, requeue=True)
        if self.events is not None:
            self.events.finished(request, outcome, decision)

    # -- queues changed at run time (add_consumer / cancel_consumer) ---------------

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

    # -- what inspect commands report ---------------------------------------------

    def active_requests(self) -> list[Request]:
        return list(self.active.values())

    def reserved_requests(self) -> list[Request]:
        return list(self.reserved)

    def scheduled_requests(self) -> list[Request]:
        return [entry[2] for entry in sorted(self._eta)]

    def broker_info(self) -> dict[str, Any]:
        """The ``broker`` section of ``inspect stats``: kombu's info, never the password."""
        connection = getattr(self.broker, "connection", None)
        if connection is None:
            return {}
        info = dict(connection.info())
        info.pop("password", None)
        return info

    def has_work(self) -> bool:
        return bool(self.active)

    def drain(self, timeout: float) -> None:
        """Wait for running tasks during a warm shutdown, settling as they end."""
        self._wait_for_finished(timeout)
        if self.broker is not None:
            try:
                self.broker.poll(0)
            except self._connection_errors():
                pass

    # -- settling ----------------------------------------------------------------

    def _ack(self, request: Request) -> None:
        if request.acked:
            return
        request.acked = True
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

    # -- messages that cannot run ------------------------------------------------

    def _on_unknown_message(self, delivery: Delivery) -> None:
        logger.warning(UNKNOWN_MESSAGE, dump_body(delivery))
        self._reject_delivery(delivery)
        signals.task_rejected.send(sender=self, message=delivery.handle, exc=None)

    def _on_invalid(self, delivery: Delivery, exc: BaseException) -> None:
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
        request = _UnknownTaskRequest(
            name=name, root_id=peeked.root_id,
            correlation_id=delivery.properties.get("correlation_id"),
            reply_to=delivery.properties.get("reply_to"),
        )
        try:
            self.store.mark_as_failure(task_id, NotRegistered(name), None, request,
                                       store_result=True, call_errbacks=True)
        except Exception:
            logger.exception("Could not store NotRegistered for %s", task_id)
        if self.events is not None:
            self.events.unknown(task_id, name)
        signals.task_unknown.send(sender=self, message=delivery.handle, exc=KeyError(name),
                                  name=name, id=task_id)

    def _discarded(self, request: Request) -> bool:
        """Expired (B16) or revoked (B18): REVOKED stored, message acked, not run.

        Checked on receipt and again just before the task would start.
        """
        message = request.message
        expires = message.expires
        expired = expires is not None and datetime.now(timezone.utc) > expires
        if expired:
            self.revoked.add(message.id)
        elif message.id not in self.revoked:
            return False
        request_logger.info("Discarding revoked task: %s[%s]", message.name, message.id)
        context = build_context(message, request_dict(message, hostname=self.hostname,
                                                      loglevel=None, logfile=None))
        ignore = message.ignore_result if message.ignore_result is not None \
            else request.task.ignore_result
        store_errors = (not ignore) or request.task.store_errors_even_if_ignored
        try:
            self.store.mark_as_revoked(message.id, "expired" if expired else "revoked",
                                       context, store_result=store_errors)
        except Exception:
            logger.exception("Could not store REVOKED for %s", message.id)
        self._ack(request)
        if self.events is not None:
            self.events.revoked(request, expired=expired)
        signals.task_revoked.send(sender=request.task, request=context, terminated=False,
                                  signum=None, expired=expired)
        return True

    # -- shutdown ------------------------------------------------------------------

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
        dropped = list(self.reserved) + [entry[2] for entry in self._eta]
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
            if not request.acked or request.ack_pending:
                continue
            try:
                self.broker.republish(request.delivery)
                logger.warning("Cold shutdown: task %s[%s] was running; its message was "
                               "returned to the queue", request.name, request.id)
            except Exception:
                logger.exception("Cold shutdown: could not return task %s[%s] to the queue",
                                 request.name, request.id)

    def close(self) -> None:
        if self.control is not None:
            self.control.stop()
        if self.heart is not None:
            self.heart.stop()
        if self.dispatcher is not None:
            self.dispatcher.close()
        if self.broker is not None:
            try:
                self.broker.close()
            except Exception:
                logger.debug("error while closing the broker connection", exc_info=True)
            self.broker = None


@dataclass
class _UnknownTaskRequest:
    """The little a backend needs to store NotRegistered (as Celery's Bunch)."""

    name: str
    root_id: Any
    correlation_id: Any
    reply_to: Any
    chord: Any = None
    errbacks: Any = None
    group: Any = None
    parent_id: Any = None
    ignore_result: bool = False

