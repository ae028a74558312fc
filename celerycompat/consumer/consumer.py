"""The consumer: deliveries in, requests to the pool, settled messages out.

One thread (the worker's main thread) runs `Consumer.run`. It alone talks
to the broker: it polls for deliveries, turns each into a `Request` (or one of
Celery's outcomes for a message it cannot run, A24-A27), holds requests until
a pool slot is free, acknowledges early-ack tasks as they start (B5), and
settles acks_late messages when their outcome comes back from a pool thread
through a queue (B6). Prefetch is Celery's: ``concurrency *
worker_prefetch_multiplier`` un-acked messages at most (B34), plus one per
message held for its ETA or waiting for a rate-limit token (ratelimits.py),
so held messages never take the slots other tasks arrive through.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import signal
import time
from collections import Counter, deque
from typing import Any, Callable, Sequence

from celery import signals
from celery.exceptions import Retry
from celery.utils.collections import LimitedSet
from celery.utils.saferepr import saferepr
from kombu.exceptions import ContentDisallowed, OperationalError

from celerycompat.celery_release import redelivered_default
from celerycompat.celery_release import setting as release_setting
from celerycompat.consumer.announce import Announcements
from celerycompat.consumer.broker import Broker, ConnectStopped, Delivery
from celerycompat.consumer.liveness import break_sockets, kombu_sockets, watchdog
from celerycompat.consumer.observers import Observers
from celerycompat.consumer.ratelimits import RateLimits
from celerycompat.consumer.request import (
    CANCELLED_ON_CONNECTION_LOSS,
    Request,
)
from celerycompat.consumer.revoked_stamps import RevokedStamps
from celerycompat.control.gossip import COMPATIBLE_TRANSPORTS as GOSSIP_TRANSPORTS
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

#: AMQP's ``basic.qos`` prefetch count is 16 bits; past it kombu's QoS asks for none.
PREFETCH_COUNT_MAX = 0xFFFF
#: Celery's warning when the connection is lost (``%s (%r)`` with the error).
CONNECTION_RETRY = ("consumer: Connection to broker lost. "
                    "Trying to re-establish the connection...")
worker_logger = logging.getLogger("celery.worker.worker")


_MISSING = object()


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


class Consumer(Announcements):
    """The consumer loop. See the module docstring for what it owns; the
    messages it does not run are `Announcements`' (consumer/announce.py)."""

    def __init__(self, *, app: Any, broker_factory: Callable[[], Broker], pool: Pool,
                 store: Any, queues: Sequence[Any],
                 decode: wire.Decoder, hostname: str, prefetch_multiplier: int,
                 purge: bool = False, dispatcher: EventDispatcher | None = None,
                 heartbeat_interval: float | None = None,
                 control: Callable[[Consumer], Any] | None = None,
                 mingle: bool = False, metrics: Any = None,
                 disable_prefetch: bool = False) -> None:
        self.app = app
        self.broker_factory = broker_factory
        self.broker: Broker | None = None
        self.pool = pool
        self.store = store
        self.queues = list(queues)
        self.decode = decode
        self.hostname = hostname
        self.prefetch_multiplier = max(0, int(prefetch_multiplier))
        #: ``--disable-prefetch``: the broker may deliver only as many messages
        #: as there are slots with nothing waiting for them (`_fetch_room`).
        self.disable_prefetch = disable_prefetch
        limit = release_setting(app.conf, "worker_eta_task_limit")
        #: ``worker_eta_task_limit``: the prefetch count never grows past it.
        self.eta_task_limit: int | None = int(limit) if limit is not None else None
        self.purge = purge
        self.generation = 0
        self.reserved: deque[Request] = deque()
        self.active: dict[int, Request] = {}
        self._eta: list[tuple[float, int, Request]] = []
        self._seq = itertools.count()
        #: Token buckets of rate-limited task types and the requests waiting
        #: on them; None with ``worker_disable_rate_limits`` (Celery reads
        #: only the setting: ``celery worker`` has no flag for it).
        self.rate_limits: RateLimits[Request] | None = \
            None if app.conf.worker_disable_rate_limits else RateLimits()
        self._qos_over = False
        self.reset_rate_limits()
        self._done: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        #: Ids of finished requests whose deferred SUCCESS write is not done yet
        #: (a count each: an id redelivered meanwhile can be there twice).
        self._writing: Counter[str] = Counter()
        self.should_stop = False
        #: Set to 1 when the consumer gave up on the broker (retrying off or
        #: used up): the worker stops and exits with it, as Celery's does.
        self.exitcode: int | None = None
        self.processed = 0
        #: Tasks accepted by name (``inspect stats`` ``total``).
        self.total_count: Counter[str] = Counter()
        #: Revoked task ids (B17): bounded, entries expire once the set is full.
        self.revoked = LimitedSet(
            maxlen=int(os.environ.get("CELERY_WORKER_REVOKES_MAX", 50000)),
            expires=float(os.environ.get("CELERY_WORKER_REVOKE_EXPIRES", 10800)))
        #: Canvas stamps revoked by ``revoke_by_stamped_headers``.
        self.revoked_stamps = RevokedStamps()
        #: The pidbox node (built by ``control(self)``), restarted on every connection.
        self.control = control(self) if control is not None else None
        self.mingle = Mingle(app, hostname, self.revoked) if mingle else None
        #: Gossip (control/gossip.py), set by the worker unless --without-gossip.
        self.gossip: Any = None
        self.dispatcher = dispatcher
        self.heart = Heart(dispatcher, interval=heartbeat_interval,
                           active=lambda: len(self.active), processed=lambda: self.processed) \
            if dispatcher is not None and heartbeat_interval else None
        self._worker_utc = app.uses_utc_timezone()
        self._worker_tz = app.timezone
        self._redelivered_default = redelivered_default()
        #: ``--autoscale`` (consumer/autoscale.py): set by the worker through
        #: `observe`, ticked every loop turn.
        self.autoscaler: Any = None
        #: What the optional parts hear of each task and turn (consumer/observers.py):
        #: the task events (with a dispatcher) and ``--metrics-port``'s metrics
        #: (observability/worker_metrics.py), then what the worker adds.
        self.observers = Observers([TaskEvents(dispatcher) if dispatcher is not None else None,
                                    metrics])
        #: The slot count the prefetch count is computed from; None: the pool's
        #: ``limit``. With --autoscale, its maximum (as Celery's).
        self.prefetch_slots: int | None = None

    def observe(self, observer: Any) -> None:
        """Let ``observer`` hear the consumer's hooks (consumer/observers.py)."""
        self.observers.add(observer)

    # -- connection ------------------------------------------------------------

    @property
    def prefetch_count(self) -> int:
        """Celery's count: slots x multiplier, plus one per held ETA task (B12, B34).

        Plus one per request waiting for a rate-limit token, which Celery
        does not add: there a flood of one rate-limited type fills every
        prefetch slot and other types wait behind it (docs/compat.md).
        """
        if not self.prefetch_multiplier:
            return 0
        waiting = len(self.rate_limits) if self.rate_limits is not None else 0
        slots = self.pool.limit if self.prefetch_slots is None else self.prefetch_slots
        base = max(slots, 1) * self.prefetch_multiplier
        held = len(self._eta) + waiting
        if held and self.eta_task_limit is not None:
            # ``worker_eta_task_limit``: Celery's QoS stops growing at this
            # value, so at most that many messages are held in memory.
            return max(1, min(base + held, self.eta_task_limit))
        return base + held

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
        errors = tuple(getattr(broker, "connection_errors", ())) or (OSError,)
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
        except errors as exc:
            _abandon(broker)
            raise _SetupLost(exc) from exc
        self.broker = broker
        self.observers.connected()
        if self.control is not None:
            self.control.start(broker.connection)
        if self.gossip is not None and broker.connection.transport.driver_type in \
                GOSSIP_TRANSPORTS:
            self.gossip.start(broker.connection)
        if self.mingle is not None and broker.connection.transport.driver_type in \
                COMPATIBLE_TRANSPORTS:
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
        adopt = getattr(self.broker, "adopt", None)
        if owed is None or adopt is None:
            return
        running = [request for request in self.active.values()
                   if not request.acked or request.ack_pending]
        try:
            kept = adopt(owed, [request.delivery for request in running])
        except self._connection_errors():
            logger.warning("Could not settle what the lost connection owed; those "
                           "messages come back after visibility_timeout", exc_info=True)
            return
        for request in running:
            if request.delivery.handle.delivery_tag in kept:
                request.generation = self.generation

    def _give_up(self) -> None:
        """No more retrying: the worker stops (warm) and exits with 1, as Celery's."""
        self.exitcode = 1
        self.should_stop = True

    # -- the loop ----------------------------------------------------------------

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Consume until `should_stop`; then stop consuming (running tasks go on)."""
        if not self._establish(first=True):
            return
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
        self._release_rate_limited()
        self.observers.turned()
        self._start_reserved()
        room = self._fetch_room()
        if room is not None:
            self.broker.limit_fetch(room)
        self.broker.set_demand(self._free_slots() - len(self.reserved))
        if (self.reserved or room == 0) and self._free_slots() == 0:
            # Nothing can start until a slot frees: wait for that instead of
            # the broker, but still let deliveries in (prefetch) and serve
            # the pidbox.
            self._wait_for_finished(0.05)
            self.broker.poll(0)
        elif self._writing and not self.reserved:
            # Results being written hold their messages (and so the prefetch
            # window): the next deliveries come once they are settled, so
            # wait for the writes, not the broker.
            self.broker.poll(0)
            if not self.reserved:
                self._wait_for_finished(0.005)
        else:
            self.broker.poll(self._poll_timeout())
        self._events_tick()

    def _events_tick(self) -> None:
        """Heartbeat when due; send this turn's task events as one batch (E2).

        Under the liveness watchdog: a publish on a half-open event
        connection (Redis waits for PUBLISH's reply) would block the
        consumer for good.
        """
        if self.dispatcher is None:
            return
        with watchdog().guard(self._break_event_connection, "events"):
            if self.heart is not None:
                self.heart.tick()
            if self.gossip is not None:
                self.gossip.tick()
            self.dispatcher.flush()

    def _break_event_connection(self) -> None:
        # The dispatcher's own connection; it reconnects after a failed publish.
        break_sockets(kombu_sockets(getattr(self.dispatcher, "_connection", None)))

    def _poll_timeout(self) -> float:
        timeout = 0.05 if self.active else 0.5
        if self._eta:
            timeout = max(0.0, min(timeout, self._eta[0][0] - time.time()))
        if self.rate_limits is not None:
            token = self.rate_limits.seconds_to_next()
            if token is not None:
                timeout = min(timeout, token)
        if self.heart is not None:
            timeout = min(timeout, self.heart.seconds_to_next())
        if self.mingle is not None and not self.mingle.done:
            timeout = min(timeout, 0.05)
        return timeout

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
        if owed is None and self.app.conf.get(
                "worker_cancel_long_running_tasks_on_connection_loss"):
            self._cancel_unackable()
        # Un-acked messages go back to the broker with the connection; the
        # copies held here can no longer be acked, so they are dropped (B36).
        self.reserved.clear()
        self._eta.clear()
        if self.rate_limits is not None:
            self.rate_limits.clear()
        if self.control is not None:
            self.control.stop()
        if self.gossip is not None:
            self.gossip.stop()
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
        except Exception as exc:  # noqa: BLE001 - junk nobody foresaw: refused, never fatal
            return self._on_invalid(delivery, exc)
        task = self.app.tasks.get(peeked.task)
        if task is None:
            return self._on_unknown_task(delivery, peeked)
        try:
            message = wire.parse(
                peeked, delivery.headers, delivery.properties, delivery.delivery_info,
                delivery.body, delivery.content_type, delivery.content_encoding,
                self.decode, worker_utc=self._worker_utc, worker_tz=self._worker_tz,
                saferepr=saferepr, redelivered_default=self._redelivered_default,
            )
        except (wire.InvalidTaskMessage, ContentDisallowed) as exc:
            return self._on_invalid(delivery, exc)
        except wire.BodyUndecodable as exc:
            return self._on_decode_error(delivery, exc)
        except Exception as exc:  # noqa: BLE001 - as above
            return self._on_invalid(delivery, exc)
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
        self.observers.received(request)
        if message.eta is not None:
            eta = message.eta.timestamp()
            if eta > time.time():
                heapq.heappush(self._eta, (eta, next(self._seq), request))
                self._update_prefetch()
                return
        if not self._admit(request):
            self._update_prefetch()
        elif self.pool.runs_inline:
            # Celery's solo pool runs each task inside the delivery callback:
            # a message fetched with others is received only after the one
            # before it ran (its ``task_received`` after that one's signals).
            self._start_reserved()

    def _admit(self, request: Request) -> bool:
        """Reserve the request, or make it wait for its type's rate-limit token.

        Returns False when it waits. As in Celery, a message with an ETA
        takes its token only once the ETA has come.
        """
        if self.rate_limits is not None and \
                not self.rate_limits.admit(request.task.name, request):
            return False
        self.reserved.append(request)
        return True

    def _release_rate_limited(self) -> None:
        """Requests whose token has come join the reserved ones (revoked ones are
        discarded there, having used their token, as in Celery)."""
        if self.rate_limits is None or not len(self.rate_limits):
            return
        released = self.rate_limits.due()
        if released:
            self.reserved.extend(released)
            self._update_prefetch()

    def reset_rate_limits(self) -> None:
        """Re-read every task's ``rate_limit`` (the ``rate_limit`` control command).

        Requests waiting on a type whose limit was removed are reserved now;
        those of a type whose rate changed go at the new rate.
        """
        if self.rate_limits is None:
            return
        freed = self.rate_limits.configure(self.app.tasks)
        if freed:
            self.reserved.extend(freed)
            self._update_prefetch()

    def _qos_value(self) -> int:
        """What the broker is told: kombu's QoS rule, no limit past AMQP's 16 bits."""
        count = self.prefetch_count
        was_over, self._qos_over = self._qos_over, count > PREFETCH_COUNT_MAX
        if self._qos_over:
            if not was_over:
                logger.warning("QoS: Disabled: prefetch_count exceeds %r", PREFETCH_COUNT_MAX)
            return 0
        return count

    def _update_prefetch(self) -> None:
        if self.broker is not None:
            self.broker.set_prefetch(self._qos_value())

    def _release_due_eta(self) -> None:
        if not self._eta:
            return
        now = time.time()
        released = False
        while self._eta and self._eta[0][0] <= now:
            _, _, request = heapq.heappop(self._eta)
            if request.generation == self.generation:
                self._admit(request)
            released = True
        if released:
            self._update_prefetch()

    # -- running -----------------------------------------------------------------

    def _free_slots(self) -> int:
        return self.pool.limit - len(self.active)

    def _fetch_room(self) -> int | None:
        """``--disable-prefetch``: slots with nothing running or waiting for them.

        The slot count is the prefetch's (with --autoscale its maximum, so
        the pool can see the load it grows for), as Celery's Redis-only
        ``can_consume`` check counts; None when prefetching is on.
        """
        if not self.disable_prefetch:
            return None
        slots = self.pool.limit if self.prefetch_slots is None else self.prefetch_slots
        return max(0, slots - len(self.active) - len(self.reserved))

    def _start_reserved(self) -> None:
        if self.mingle is not None and not self.mingle.done:
            # Peers' revoked ids are not merged yet: nothing starts before.
            self.mingle.poll()
            if not self.mingle.done:
                return
        while self.reserved and self._free_slots() > 0 and not self.should_stop:
            request = self.reserved.popleft()
            if request.generation != self.generation or self._discarded(request, starting=True):
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
        self.observers.started(request)
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
        self._settle_item(item)
        self._settle_finished()

    def _settle_finished(self) -> None:
        while True:
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return
            self._settle_item(item)

    def _settle_item(self, item: tuple) -> None:
        """An outcome from a pool, or (with its write's future) one whose
        deferred SUCCESS write has just finished."""
        if len(item) == 3:
            request, outcome, durable = item
            self._writing[request.id] -= 1
            if self._writing[request.id] <= 0:
                del self._writing[request.id]
            self._settle_written(request, self._after_write(request, outcome, durable))
        else:
            self._settle(*item)

    def _settle(self, request: Request, outcome: Outcome) -> None:
        self.active.pop(id(request), None)
        if request.terminated:
            # Announced (REVOKED, acked) when it was terminated; now its slot is free.
            self.processed += 1
            return
        if request.ack_pending:
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

    def _acks_on_failure_or_timeout(self, task: Any) -> bool:
        # A bound task carries the setting; the app's configuration is only
        # read for one that does not (reading it costs more than settling).
        value = getattr(task, "acks_on_failure_or_timeout", _MISSING)
        if value is _MISSING:
            value = self.app.conf.task_acks_on_failure_or_timeout
        return bool(value)

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

    # -- running tasks and slots changed at run time (remote control, autoscale) --

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

    # -- what inspect commands report ---------------------------------------------

    def results_in_flight(self) -> set[str]:
        """Ids of finished tasks whose SUCCESS write (group commit) has not
        landed yet. Celery writes before it reads another control message,
        so to a ``revoke`` these are already SUCCESS, never to be marked
        REVOKED (a read in between would see PENDING)."""
        return set(self._writing)

    def active_requests(self) -> list[Request]:
        """Running requests; a terminated one is no longer listed (Celery's ``task_ready``)."""
        return [request for request in self.active.values() if not request.terminated]

    def reserved_requests(self) -> list[Request]:
        return list(self.reserved)

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
        connection = getattr(self.broker, "connection", None)
        if connection is None:
            return {}
        info = dict(connection.info())
        info.pop("password", None)
        return info

    def has_work(self) -> bool:
        """Tasks running, or finished with their SUCCESS still being written."""
        return bool(self.active) or bool(self._writing)

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
            if not request.acked or request.ack_pending or request.terminated:
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
        if self.gossip is not None:
            self.gossip.stop()
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
