"""The native Redis `Broker`: batched fetch and acks in kombu's own key layout.

Why: kombu delivers one message per poll, and each costs three round trips
(BRPOP, a MULTI to record it as un-acked, another MULTI to ack it) plus a
pipeline object per step. That, not the task, is what caps a Celery worker
on Redis at about a thousand tasks a second (issue 8).

What stays kombu's: the connection (URL, TLS, Sentinel, auth, every
``broker_transport_options`` value), queue and binding declarations, the
message envelope and its decoding (kombu's own ``Message`` class), requeue
and restore (kombu's own ``restore_by_tag``), and the pidbox, which keeps
consuming through kombu on the same connection. What changes is only how
task messages leave their queues and how acks reach Redis:

* fetch: one Lua script (redis_fetch.lua) pops up to the free prefetch slots
  and records each message in ``unacked``/``unacked_index`` exactly as kombu's
  QoS does, atomically. When the queues are empty the adapter waits without
  taking anything off a list (a ``BLMOVE key key RIGHT RIGHT`` per key, on
  connections of its own; Redis >= 6.2) and the next fetch leases what
  arrived: a worker killed at any moment leaves every message either on its
  list or in ``unacked``. Older servers get kombu's BRPOP, its reply leased
  within the same poll.
* acks: collected while the consumer settles a turn's worth of tasks and
  sent as one ZREM + HDEL transaction at the next poll. An ack is never sent
  before the consumer asks for it, so "result stored before ack" holds.
* leases: the tags held (reserved, ETA, running) are re-scored in
  ``unacked_index`` well inside ``visibility_timeout`` (redis_lease.py), and
  the restore of dead workers' messages that kombu runs in its poll loop runs
  here on a timer.

A cluster can mix this path, kombu's path and stock Celery workers on the
same queues: the state in Redis is the same whichever consumer wrote it.
"""

from __future__ import annotations

import logging
import time
from importlib import resources
from typing import Any, Sequence

import orjson
from kombu import Connection
from kombu.utils.json import loads as kombu_loads

from celerycompat.backends.riding_acks import AckTicket, server_of
from celerycompat.consumer.broker import Delivery, DeliveryCallback
from celerycompat.consumer.kombu_broker import KombuBroker, to_delivery
from celerycompat.consumer.liveness import break_sockets, guarded
from celerycompat.consumer.redis_eligibility import expires
from celerycompat.consumer.redis_lease import LeaseKeeper, plain_client
from celerycompat.consumer.redis_restore import RESTORE_SCRIPT, restore_messages
from celerycompat.consumer.redis_wait import RedisWaiting, _text

logger = logging.getLogger("celery.worker.consumer.connection")

FETCH_SCRIPT = resources.files("celerycompat.consumer").joinpath(
    "redis_fetch.lua").read_text()

#: Messages fetched at most per script call when prefetch is unlimited.
UNLIMITED_BATCH = 100
#: At most this long (seconds) an ack waits to ride with the next fetch
#: while the pool is busy; an idle poll sends it at once.
ACK_DELAY = 0.01


class RedisBroker(RedisWaiting, KombuBroker):
    """Task queues through the native path; everything else through kombu."""

    def __init__(self, connection: Connection, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self._on_delivery: DeliveryCallback | None = None
        self._queues: list[str] = []
        self._consuming = False
        self._rotation = 0
        #: Delivery tags handed to the consumer and not settled yet.
        self._held: dict[str, None] = {}
        #: Tags of running early-ack tasks whose ack their run makes
        #: (`hand_over`): not prefetched any more, still acked at settle.
        self._ridden: dict[str, None] = {}
        self._acks: list[str] = []
        #: When the oldest pending ack must go even if no fetch does.
        self._acks_due = 0.0
        #: `set_demand`: deliveries the pool could start right now.
        self._demand = 1
        self._requeues: list[str] = []
        self._client: Any = None
        self._fetch: Any = None
        self._lease: LeaseKeeper | None = None
        self._next_restore = 0.0
        self._next_kombu_poll = 0.0
        self._blocking: Any = None  # the BRPOP connection
        self._blocking_id: int | None = None
        self._brpop_sent_at: float | None = None
        self._brpop_deadline = 0.0
        self._fractional_timeout = False
        #: Redis >= 6.2: wait with non-destructive BLMOVEs, one connection per key.
        self._rotate_wait = False
        self._waiters: dict[str, Any] = {}
        self._waiting: dict[str, float] = {}  # key -> when its BLMOVE went out
        self._brpop_keys: dict[str, str] = {}
        self.ack_server: tuple | None = None  # known once consuming
        self._db = 0

    # -- setup -------------------------------------------------------------

    @guarded("consume")
    def consume(self, queues: Sequence[Any], on_delivery: DeliveryCallback) -> None:
        channel = self._channel = self.connection.default_channel
        for queue in queues:
            queue.bind(channel).declare()
        self._on_delivery = on_delivery
        self._queues = [queue.name for queue in queues]
        prefix = channel.global_keyprefix or ""
        self._prefix = prefix
        self._unacked = prefix + channel.unacked_key
        self._unacked_index = prefix + channel.unacked_index_key
        self._client = plain_client(channel)
        version = _server_version(self._client)
        self._fractional_timeout = version >= (6, 0)
        self._rotate_wait = version >= (6, 2)
        self.ack_server = server_of(self._client)
        self._db = int(self._client.connection_pool.connection_kwargs.get("db") or 0)
        self._fetch = self._client.register_script(FETCH_SCRIPT)
        self._restore = self._client.register_script(RESTORE_SCRIPT)
        self._lease = LeaseKeeper(self._client, self._unacked_index,
                                  channel.visibility_timeout)
        self._lease.start(lambda: [*self._held, *self._ridden])
        # Dead workers' messages are looked for as kombu's event loop does:
        # a call every ``unacked_restore_interval`` s, a scan every
        # ``unacked_restore_throttle``-th call.
        self._restore_interval = float(channel.unacked_restore_interval)
        self._next_restore = time.monotonic()
        self._consuming = True

    @guarded("add_consumer")
    def add_queue(self, queue: Any) -> None:
        queue.bind(self._channel).declare()
        if expires(queue):
            logger.warning("Queue %s expires (x-expires): its TTL is refreshed by "
                           "publishers only while ccworker consumes it", queue.name)
        if queue.name not in self._queues:
            self._queues.append(queue.name)

    def cancel_queue(self, name: str) -> None:
        self._queues = [queue for queue in self._queues if queue != name]
        keys = set(self._wait_keys())
        for key in [key for key in self._waiters if key not in keys]:
            self._drop_waiter(key)

    def set_prefetch(self, count: int) -> None:
        self._prefetch = count

    def limit_fetch(self, room: int | None) -> None:
        """Every fetch is a pull bounded by `_room`: nothing to send."""
        self._window = room

    def set_demand(self, wanted: int) -> None:
        self._demand = wanted

    def _batch_floor(self) -> int:
        """The fewest messages worth a fetch while the pool has work queued.

        Why: a busy pool frees one slot at a time, and fetching as soon as
        one is free costs a script call (a round trip and its Python) per
        task or two. While reserved tasks cover every free slot, waiting
        until half the prefetch window is free starts nothing later and
        fetches (and acks) in batches. An idle slot fetches at once.
        """
        return max(1, self._prefetch // 2)

    # -- the poll ----------------------------------------------------------

    @guarded("poll", waits=True)
    def poll(self, timeout: float) -> None:
        """Settle acks, keep leases fresh, deliver what is ready or wait for it.

        Waiting never takes a message off its list: on Redis >= 6.2 each
        queue key has a connection blocked in ``BLMOVE key key RIGHT RIGHT``,
        which returns once the list holds a message and leaves it in place
        (moved from its tail to its tail); the next poll's fetch script then
        leases it. A BRPOP, which kombu and older servers use, pops the
        message: until it is leased a worker killed would take it along
        (lost for good, kombu #305). On Redis < 6.2 that BRPOP is outstanding
        only inside this call, for at most ``timeout``, and its reply leased
        before the call returns, so the window is one round trip.

        When a fetch goes out, the pending acks ride along in the same script
        call: one round trip per turn for both.
        """
        self._flush_requeues()
        self._maintain()
        room = self._room()
        floor = self._batch_floor()
        if room <= 0 or (self._demand <= 0 and room < floor):
            # Busy: acks wait (briefly) for the fetch they can ride with.
            if timeout > 0 or len(self._acks) >= floor or time.monotonic() >= self._acks_due:
                self._flush_acks()
            self._wait(timeout)
            return
        if self._brpop_sent_at is None and self._consuming and self._queues:
            if self._fetch_batch(room, popped=""):
                return
            if self._rotate_wait:
                self._arm_waiters()
            elif timeout > 0:
                self._send_brpop(timeout)
        self._flush_acks()
        self._wait(timeout)

    def _room(self) -> int:
        room = UNLIMITED_BATCH if not self._prefetch \
            else max(0, self._prefetch - len(self._held))
        return room if self._window is None else min(room, self._window)

    def _keys(self) -> list[str]:
        """kombu's BRPOP order: priority steps outer, queues inner, rotated for fairness."""
        queues = self._queues
        start = self._rotation % len(queues)
        self._rotation += 1
        rotated = queues[start:] + queues[:start]
        channel = self._channel
        return [self._prefix + channel._q_for_pri(queue, pri)
                for pri in channel.priority_steps for queue in rotated]

    def _fetch_batch(self, room: int, popped: str | bytes) -> int:
        acks, self._acks = self._acks, []
        try:
            reply = self._fetch(keys=[self._unacked, self._unacked_index, *self._keys()],
                                args=[repr(time.time()), room, popped, *acks],
                                client=self._client)
        except BaseException:
            self._acks[:0] = acks  # not sent: they go with the next attempt
            raise
        for index in range(0, len(reply), 2):
            self._deliver(reply[index], _text(reply[index + 1]))
        return len(reply) // 2

    def _deliver(self, raw: bytes, tag: str) -> None:
        try:
            payload = _loads(raw)
            message = self._channel.Message(payload, channel=self._channel)
        except Exception as exc:
            logger.critical("Received and deleted a message the transport could not "
                            "decode: %r", exc, exc_info=True)
            if tag:
                self._acks.append(tag)
            return
        if not tag:
            logger.critical("Received and deleted a message without a delivery tag "
                            "or delivery info: %.200r", raw)
            return
        self._held[tag] = None
        if self._window:
            self._window -= 1
        assert self._on_delivery is not None
        self._on_delivery(to_delivery(message))

    # -- keeping state fresh -------------------------------------------------

    def _maintain(self) -> None:
        """Look for dead workers' messages, as kombu's poll loop does."""
        now = time.monotonic()
        if now >= self._next_restore:
            self._next_restore = now + self._restore_interval
            channel = self._channel
            channel.qos.restore_visible(num=channel.unacked_restore_limit,
                                        interval=channel.unacked_restore_throttle)

    # -- settling ------------------------------------------------------------

    def ack_ticket(self, delivery: Delivery, early: bool) -> AckTicket | None:
        """The ack as a result store on the same server can make it: the tag
        is a key of kombu's ``unacked`` hash, valid on any connection."""
        if self.ack_server is None:
            return None
        return AckTicket(self.ack_server, self._db, self._unacked, self._unacked_index,
                         delivery.handle.delivery_tag, early)

    def hand_over(self, delivery: Delivery) -> None:
        """The run acks this early-ack message (`ack_ticket`): it leaves the
        prefetch count now, as an acked one does; the consumer's `ack` at
        settle still follows (removing a removed tag is a no-op)."""
        tag = delivery.handle.delivery_tag
        if self._held.pop(tag, 0) is None:
            self._ridden[tag] = None

    def ack(self, delivery: Delivery) -> None:
        tag = delivery.handle.delivery_tag
        if self._held.pop(tag, 0) is None or self._ridden.pop(tag, 0) is None:
            self._owe_ack(tag)

    def reject(self, delivery: Delivery, requeue: bool) -> None:
        tag = delivery.handle.delivery_tag
        if self._held.pop(tag, 0) is not None:
            return
        if requeue:
            self._requeues.append(tag)
        else:
            self._owe_ack(tag)

    def _owe_ack(self, tag: str) -> None:
        if not self._acks:
            self._acks_due = time.monotonic() + ACK_DELAY
        self._acks.append(tag)

    @guarded("ack")
    def flush(self) -> None:
        self._flush_acks()

    def _flush_requeues(self) -> None:
        if self._requeues:
            tags, self._requeues = self._requeues, []
            try:
                self.restore(tags, leftmost=True)
            except BaseException:
                self._requeues[:0] = tags  # owed still: `abandon` hands them on
                raise

    def _flush_acks(self) -> None:
        self._flush_requeues()
        if not self._acks:
            return
        tags, self._acks = self._acks, []
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.zrem(self._unacked_index, *tags)
            pipe.hdel(self._unacked, *tags)
            pipe.execute()
        except BaseException:
            # Not acked (or not known to be): still owed, so a connection lost
            # here hands them to the next one (`abandon`/`adopt`) instead of
            # the messages coming back after visibility_timeout. Acking twice
            # is harmless.
            self._acks[:0] = tags
            raise

    def restore(self, tags: Sequence[str], leftmost: bool) -> None:
        """Put held messages back where they were published (redis_restore.py)."""
        restore_messages(self._client, self._channel, self._prefix, self._unacked,
                         self._unacked_index, self._restore, tags, leftmost)

    # -- stopping ------------------------------------------------------------

    @guarded("cancel")
    def cancel(self) -> None:
        """No more deliveries; a BRPOP in flight is unblocked and its message returned."""
        self._consuming = False
        self._drop_waiters()
        if self._brpop_sent_at is None:
            return
        try:
            if self._blocking_id is not None:
                self._client.client_unblock(self._blocking_id)
            self._read_brpop()
        except self.connection_errors:
            self._drop_blocking()
        except Exception:
            # CLIENT UNBLOCK not allowed: the reply comes within BRPOP_TIMEOUT.
            self._read_brpop()

    @guarded("close")
    def close(self) -> None:
        """Send pending acks and give every held message back, as kombu does at close."""
        try:
            if self._client is not None:
                self.cancel()
                self._flush_acks()
                held, self._held = list(self._held), {}
                self.restore(held, leftmost=False)
        except Exception:
            logger.debug("could not return held messages; they come back after "
                         "visibility_timeout", exc_info=True)
        finally:
            self._drop_blocking()
            self._drop_waiters()
            super().close()

    def break_connection(self) -> None:
        super().break_connection()
        blocking = self._blocking
        socks = [conn._sock for conn in self._waiters.values()]
        if blocking is not None:
            socks.append(blocking._sock)
        break_sockets(socks)

    def abandon(self) -> dict[str, list[str]]:
        """The connection is lost: drop it without a word to Redis, and return
        what it still owed: acks and requeues not sent, and every tag held.

        Delivery tags are Redis keys, not per connection, so the next
        connection can settle all of it (`adopt`), which kombu's path cannot.
        """
        self.break_connection()
        owed = {"acks": list(self._acks), "requeues": list(self._requeues),
                "held": [*self._held, *self._ridden], "ridden": list(self._ridden)}
        self._acks, self._requeues, self._held, self._ridden = [], [], {}, {}
        self._consuming = False
        self._brpop_sent_at = None
        self._blocking = None  # its socket is shut: never read again
        self._drop_waiters()
        super().abandon()
        return owed

    @guarded("adopt")
    def adopt(self, owed: dict[str, list[str]], running: Sequence[Delivery]) -> set[str]:
        """Settle, on this connection, what a lost one owed (`abandon`).

        The messages of ``running`` (tasks still running, never acked) are
        held and leased here and acked when they end; the lost acks and
        requeues are sent; every other held message (reserved, ETA,
        rate-limited: the consumer dropped them) goes back to its queue now,
        not after ``visibility_timeout``. Returns the tags now held here.
        """
        lost = set(owed["held"])
        ridden = set(owed.get("ridden", ()))
        kept = {delivery.handle.delivery_tag for delivery in running} & lost
        for tag in kept:
            if tag in ridden:
                self._ridden[tag] = None
            else:
                self._held[tag] = None
        if kept and self._lease is not None:
            # Their lease went unrefreshed while the connection was down:
            # renew it before any restore (ours included) finds it stale.
            self._lease.refresh(kept)
        self._acks.extend(owed["acks"])
        # An early-acked message is never given back, even if its task is over.
        self._acks.extend(tag for tag in ridden if tag not in kept)
        self._requeues.extend(owed["requeues"])
        self._flush_acks()
        self.restore([tag for tag in owed["held"] if tag not in kept and tag not in ridden],
                     leftmost=False)
        return kept

    def _drop_blocking(self) -> None:
        blocking, self._blocking = self._blocking, None
        self._brpop_sent_at = None
        self._blocking_id = None
        if blocking is not None:
            try:
                blocking.disconnect()
                self._client.connection_pool.release(blocking)
            except Exception:
                pass


def _server_version(client: Any) -> tuple[int, ...]:
    """``redis_version`` of INFO as a tuple; (0,) if the server hides it.

    Unknown is taken as old: waiting falls back to BRPOP, which can lose a
    message popped at the instant of a crash (docs/reliability.md), so that
    is said once, not done silently.
    """
    try:
        version = client.info("server").get("redis_version", "0")
        parsed = tuple(int(part) for part in str(version).split(".")[:2])
        why = None if parsed >= (1,) else f"INFO says redis_version={version!r}"
    except Exception as exc:
        parsed, why = (0,), f"INFO failed: {exc!r}"
    if why is not None:
        logger.warning("Redis server version unknown (%s): waiting for tasks with BRPOP, "
                       "as kombu does; a message popped at the instant of a crash can be "
                       "lost (BLMOVE needs Redis >= 6.2)", why)
    return parsed


def _loads(raw: bytes) -> Any:
    """The transport envelope: plain JSON, so orjson (kombu's loads for what it rejects)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return kombu_loads(raw)

