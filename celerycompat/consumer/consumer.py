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
import time
from collections import Counter, deque
from typing import Any, Callable, Sequence

from celery import signals
from celery.utils.collections import LimitedSet
from celery.utils.saferepr import saferepr
from kombu.exceptions import ContentDisallowed

from celerycompat.backends import riding_acks
from celerycompat.celery_release import redelivered_default
from celerycompat.celery_release import setting as release_setting
from celerycompat.consumer.announce import Announcements
from celerycompat.consumer.broker import Broker, Delivery
from celerycompat.consumer.connection import ConnectionLifecycle
from celerycompat.consumer.controls import ConsumerControls
from celerycompat.consumer.done_queue import DoneQueue
from celerycompat.consumer.holding import Holding
from celerycompat.consumer.liveness import watchdog
from celerycompat.consumer.observers import Observers
from celerycompat.consumer.ratelimits import RateLimits
from celerycompat.consumer.request import (
    Request,
)
from celerycompat.consumer.revoked_stamps import RevokedStamps
from celerycompat.consumer.settling import Settling
from celerycompat.control.mingle import Mingle
from celerycompat.events.dispatcher import EventDispatcher
from celerycompat.events.heartbeat import Heart
from celerycompat.events.task_events import TaskEvents
from celerycompat.pools.base import Pool
from celerycompat.protocol import message as wire

logger = logging.getLogger("celery.worker.consumer.consumer")
strategy_logger = logging.getLogger("celery.worker.strategy")
request_logger = logging.getLogger("celery.worker.request")

class Consumer(ConnectionLifecycle, Settling, Holding, ConsumerControls, Announcements):
    """The consumer loop. See the module docstring for what it owns; its
    other concerns are mixins, each in its own module: the connection
    (consumer/connection.py), settling finished tasks (consumer/settling.py),
    holding ETA and rate-limited tasks and the prefetch count that follows
    (consumer/holding.py), what remote control and inspect ask of it
    (consumer/controls.py), and the messages it does not run
    (consumer/announce.py)."""

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
        #: Those of ``active`` the pool took ahead of a free slot
        #: (``pool.queue_ahead``), oldest first: reserved to ``inspect``, not
        #: started (no ``time_start``, event or early ack) until a slot frees
        #: for them (`_promote_waiting`).
        self._waiting: dict[int, Request] = {}
        self._eta: list[tuple[float, int, Request]] = []
        self._seq = itertools.count()
        #: Token buckets of rate-limited task types and the requests waiting
        #: on them; None with ``worker_disable_rate_limits`` (Celery reads
        #: only the setting: ``celery worker`` has no flag for it).
        self.rate_limits: RateLimits[Request] | None = \
            None if app.conf.worker_disable_rate_limits else RateLimits()
        self._qos_over = False
        self.reset_rate_limits()
        self._done = DoneQueue()
        #: Ids of finished requests whose deferred SUCCESS write is not done yet
        #: (a count each: an id redelivered meanwhile can be there twice).
        self._writing: Counter[str] = Counter()
        #: The same requests, by identity: their messages are still held (an
        #: ``acks_late`` one is un-acked until the write lands), so a new
        #: connection must keep them as it keeps running ones (`_adopt`).
        self._awaiting_write: dict[int, Request] = {}
        #: How runs take part in acks (backends/riding_acks.py), per
        #: connection: "ride" (the result store acks, same Redis server),
        #: "notice" (results deferred: the run says when an early ack is
        #: due) or None.
        self._ack_tickets: str | None = None
        self._noticed: dict[int, Request] = {}
        #: Acks made this turn that must not wait for the next fetch (`Settling`).
        self._acks_urgent = False
        riding_acks.on_ack_due(self._ack_due)
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
        #: Gossip (control/gossip.py), set by the worker unless --without-gossip;
        #: an observer (its connection, ticks and stop), kept here for the
        #: ``election`` control command.
        self.gossip: Any = None
        self.dispatcher = dispatcher
        self.heart = Heart(dispatcher, interval=heartbeat_interval,
                           active=self.running_count, processed=lambda: self.processed) \
            if dispatcher is not None and heartbeat_interval else None
        self._worker_utc = app.uses_utc_timezone()
        self._worker_tz = app.timezone
        self._redelivered_default = redelivered_default()
        #: ``--autoscale`` (consumer/autoscale.py): set by the worker through
        #: `observe`, ticked every loop turn.
        self.autoscaler: Any = None
        #: The project's own bootsteps (project_steps.py), set by the worker:
        #: ``inspect stats`` shows what their ``info`` returns.
        self.project_steps: Any = None
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

    # -- the loop ----------------------------------------------------------------

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Consume until `should_stop`; then stop consuming (running tasks go on)."""
        if not self._establish(first=True) or self.exitcode is not None:
            return  # no broker, or a consumer step failed to start (project_steps.py)
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
        if (self.reserved or room == 0) and self._free_slots() == 0 or self._pool_busy():
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
            self.observers.ticked()  # gossip
            self.dispatcher.flush()

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

    # -- running -----------------------------------------------------------------

    def _free_slots(self) -> int:
        """Tasks the pool takes now: its slots and what it queues ahead."""
        return self.pool.limit + self.pool.queue_ahead - len(self.active)

    def _pool_busy(self) -> bool:
        """Every slot runs a task: what matters next is a task ending, so the
        consumer waits for that and polls the broker without waiting. A
        prefetch window that running tasks fill (``acks_late`` with
        ``--prefetch-multiplier 1``) otherwise kept it waiting on the broker
        for up to its poll timeout while finished tasks, and the acks that
        free the window, waited to be settled: 26 ms a task instead of 2."""
        return bool(self.active) and self._slots_full()

    def running_count(self) -> int:
        """Tasks started and not over (Celery's ``len(active_requests)``)."""
        return len(self.active) - len(self._waiting)

    def _slots_full(self) -> bool:
        """Every slot has a started task; one handed over now waits in the pool."""
        return self.running_count() >= self.pool.limit

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
        """Hand to the pool; started now if a slot is free, else once one
        frees for it (it waits in the pool: `Pool.queue_ahead`)."""
        request.pid_lookup = self.pool.pid_for
        waits = self._slots_full()
        self.active[id(request)] = request
        if self._acks_with_run(request):
            self._ticket_for_run(request)
        if waits:
            self._waiting[id(request)] = request
        else:
            self._accept(request)
        done = self._done
        self.pool.apply(request.message.task, request.message,
                        lambda outcome: done.put((request, outcome)))
        if self.pool.runs_inline:
            self._settle_finished()

    def _accept(self, request: Request) -> None:
        """A slot takes it: Celery's ``on_accepted`` (time_start, the count,
        the early ack, ``task-started``; B5)."""
        request.time_start = time.time()
        self.total_count[request.message.name] += 1
        if self._acks_with_run(request):
            self._hand_ack_to_run(request)
        if not request.acks_late and not request.ack_rides:
            if self.pool.runs_inline:
                # Celery queues the early ack for its next loop turn, which a
                # solo pool reaches only after the task: the message stays
                # un-acked (and is redelivered if the worker dies) meanwhile.
                request.acked = request.ack_pending = True
            else:
                self._ack(request)
        self.observers.started(request)

    def _acks_with_run(self, request: Request) -> bool:
        """Its run takes part in its ack (backends/riding_acks.py): this
        connection allows it and the task uses the worker's result store."""
        return bool(self._ack_tickets) and getattr(request.task, "_backend", None) is None

    def _promote_waiting(self) -> None:
        """Start the oldest waiting requests as slots free, in the order the
        pool gives its queued jobs to children."""
        waiting = self._waiting
        while waiting and not self._slots_full():
            request = waiting.pop(next(iter(waiting)))
            if not request.terminated:
                self._accept(request)

    def take_back_waiting(self) -> list[Request]:
        """Requests still waiting in the pool, taken back (oldest first) before
        any slot has taken them: the consumer holds their messages again,
        un-acked, as reserved ones (warm shutdown returns them, a revoke
        discards them; Celery's pool cancels jobs no process accepted)."""
        if not self._waiting:
            return []
        by_message = {id(request.message): request for request in self._waiting.values()}
        taken = []
        for message in self.pool.withdraw([r.message for r in self._waiting.values()]):
            request = by_message[id(message)]
            del self._waiting[id(request)]
            self.active.pop(id(request), None)
            request.message.ack_ticket = None  # made again if it is handed over again
            taken.append(request)
        return taken

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

    # -- shutdown ------------------------------------------------------------------

    def close(self) -> None:
        if self.control is not None:
            self.control.stop()
        self.observers.closed()  # gossip
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
