"""How the native Redis path waits for messages without taking them.

With nothing to fetch, `RedisBroker.poll` waits here, and the pidbox, which
kombu consumes on the same connection, is served meanwhile:

* Redis >= 6.2: one connection per queue key blocked in a non-destructive
  ``BLMOVE key key RIGHT RIGHT`` ("waiters"): it returns once the list holds
  a message and leaves the message in place, and the next fetch leases it,
  so a worker killed while waiting takes nothing along.
* Older servers: kombu's ``BRPOP`` on a connection of ours, outstanding only
  inside one poll; its reply is leased (pushed back through the fetch
  script) before the poll returns, and a reply that does not come within
  ``BRPOP_GRACE`` past its timeout means a dead connection.
* Between waits, kombu polls its own connection (the pidbox) whenever one
  of its sockets is readable, or every ``KOMBU_POLL_INTERVAL`` while busy.

These are `RedisBroker`'s methods (a mixin); what they use of it is listed
on `RedisWaiting`.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from celerycompat.consumer.liveness import readable

logger = logging.getLogger("celery.worker.consumer.connection")

#: BRPOP's server-side timeout on Redis < 6, which takes whole seconds only
#: (newer servers wait exactly the poll's timeout).
BRPOP_TIMEOUT = 1
#: Server-side seconds of each wake-up ``BLMOVE`` (Redis >= 6.2); re-sent
#: while the worker waits for messages.
WAKE_TIMEOUT = 1
#: How often (seconds) a consumer too busy to wait still lets kombu poll
#: its own connection (the pidbox) when no socket of it is readable.
KOMBU_POLL_INTERVAL = 0.01
#: A BRPOP with no reply this long past its timeout is on a dead connection.
BRPOP_GRACE = 10.0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisWaiting:
    """`RedisBroker`'s waiting (module docstring).

    What it uses of the broker: ``connection`` and ``connection_errors``
    (kombu's), ``_client`` (our redis-py client), ``_channel`` and
    ``_prefix`` (kombu's key layout), ``_queues`` and ``_consuming``,
    ``_keys`` / ``_room`` / ``_fetch_batch`` to lease what arrived, ``_drain``
    (kombu's ``drain_events``, for the pidbox and any other kombu consumer), the
    waiting state made in its ``__init__`` (``_blocking``, ``_blocking_id``,
    ``_brpop_sent_at``, ``_brpop_deadline``, ``_brpop_keys``,
    ``_fractional_timeout``, ``_rotate_wait``, ``_waiters``, ``_waiting``,
    ``_next_kombu_poll``).
    """

    connection: Any
    connection_errors: tuple
    _client: Any
    _channel: Any
    _prefix: str
    _queues: list[str]
    _consuming: bool
    _blocking: Any
    _blocking_id: int | None
    _brpop_sent_at: float | None
    _brpop_deadline: float
    _brpop_keys: dict[str, str]
    _fractional_timeout: bool
    _rotate_wait: bool
    _waiters: dict[str, Any]
    _waiting: dict[str, float]
    _next_kombu_poll: float

    if TYPE_CHECKING:  # the broker's, used here
        def _keys(self) -> list[str]:
            ...

        def _room(self) -> int:
            ...

        def _fetch_batch(self, room: int, popped: str | bytes) -> int:
            ...

        def _drop_blocking(self) -> None:
            ...

        def _drain(self, timeout: float) -> bool:
            ...

    def _send_brpop(self, timeout: float) -> None:
        if self._blocking is None:
            self._blocking = self._client.connection_pool.get_connection()
            self._blocking.send_command("CLIENT", "ID")
            self._blocking_id = int(self._blocking.read_response())
        keys = self._keys()
        self._brpop_keys = {key: key for key in keys}
        # Redis takes 0 as "forever": never below a millisecond.
        wait = max(0.001, round(timeout, 3)) if self._fractional_timeout \
            else max(BRPOP_TIMEOUT, math.ceil(timeout))
        self._blocking.send_command("BRPOP", *keys, wait)
        self._brpop_sent_at = time.monotonic()
        self._brpop_deadline = self._brpop_sent_at + wait + BRPOP_GRACE

    def _wait(self, timeout: float) -> None:
        # kombu registers the pidbox subscription (and reads what its parser
        # already buffered) only inside a poll of its own. A busy consumer
        # polls without waiting after every finished task, and kombu's poll
        # costs more than our fetch: then it runs every KOMBU_POLL_INTERVAL
        # (and whenever its socket is readable, below).
        now = time.monotonic()
        if timeout > 0 or now >= self._next_kombu_poll:
            self._next_kombu_poll = now + KOMBU_POLL_INTERVAL
            self._drain(0)
        if self._brpop_sent_at is None:
            if self._waiting and self._read_buffered_waiters():
                return
            waiters = {self._waiters[key]._sock: key for key in self._waiting}
            readers = self._kombu_sockets() + [sock for sock in waiters if sock is not None]
            if not readers:
                if timeout > 0:
                    time.sleep(timeout)
                return
            ready = readable(readers, max(0.0, timeout))
            for sock in ready:
                if sock in waiters:
                    self._read_waiter(waiters[sock])
            if any(sock not in waiters for sock in ready):
                self._drain(0)
            self._check_waiters()
            return
        # The BRPOP's reply comes within its server-side timeout; the
        # pidbox is served meanwhile. No reply by the deadline: the
        # connection is half-open (a live server always answers in time).
        while True:
            if self._blocking_can_read():
                return self._read_brpop()
            brpop_sock = self._blocking._sock
            if brpop_sock is None:
                raise ConnectionError("the Redis BRPOP connection was closed")
            remaining = self._brpop_deadline - time.monotonic()
            if remaining <= 0:
                self._drop_blocking()
                raise ConnectionError("Redis BRPOP got no reply; the connection is "
                                      "presumed dead")
            ready = readable([*self._kombu_sockets(), brpop_sock], remaining)
            if any(sock is not brpop_sock for sock in ready):
                self._drain(0)
            if brpop_sock in ready:
                return self._read_brpop()

    # -- the non-destructive wake-up (Redis >= 6.2) ---------------------------

    def _wait_keys(self) -> list[str]:
        """Every list a message for this worker can arrive on (no rotation)."""
        channel = self._channel
        return [self._prefix + channel._q_for_pri(queue, pri)
                for pri in channel.priority_steps for queue in self._queues]

    def _arm_waiters(self) -> None:
        """Each key without a BLMOVE outstanding gets one, on a connection of its own.

        The connections are made outside kombu's pool (its ``max_connections``
        is shared with everything else on the channel).
        """
        pool = self._client.connection_pool
        for key in self._wait_keys():
            if key in self._waiting:
                continue
            conn = self._waiters.get(key)
            if conn is None:
                conn = self._waiters[key] = pool.connection_class(**pool.connection_kwargs)
            conn.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", WAKE_TIMEOUT)
            self._waiting[key] = time.monotonic()

    def _read_buffered_waiters(self) -> bool:
        """Replies already in redis-py's buffer (invisible to select()); True if any."""
        read = False
        for key in list(self._waiting):
            try:
                buffered = self._waiters[key].can_read(timeout=0)
            except Exception:
                buffered = False
            if buffered:
                self._read_waiter(key)
                read = True
        return read

    def _read_waiter(self, key: str) -> None:
        """The wake-up's reply: a message is there (left in place), or the timeout."""
        try:
            self._waiters[key].read_response()
        except ResponseError as exc:
            # A server that says it is 6.2 but has no BLMOVE (some
            # Redis-compatible services): wait with BRPOP from now on.
            logger.warning("Redis refused BLMOVE (%s); waiting with BRPOP instead", exc)
            self._rotate_wait = False
            self._drop_waiters()
            return
        del self._waiting[key]

    def _check_waiters(self) -> None:
        """A live server answers a BLMOVE within its timeout; silence means half-open."""
        now = time.monotonic()
        for key, sent in self._waiting.items():
            if now - sent > WAKE_TIMEOUT + BRPOP_GRACE:
                self._drop_waiters()
                raise ConnectionError(f"Redis BLMOVE on {key!r} got no reply; the "
                                      "connection is presumed dead")

    def _drop_waiter(self, key: str) -> None:
        conn = self._waiters.pop(key, None)
        self._waiting.pop(key, None)
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:
                pass

    def _drop_waiters(self) -> None:
        """Disconnect every wake-up connection: safe at any time, they hold no message."""
        for key in list(self._waiters):
            self._drop_waiter(key)

    def _blocking_can_read(self) -> bool:
        """A reply already in redis-py's buffer is invisible to select()."""
        try:
            return bool(self._blocking.can_read(timeout=0))
        except Exception:
            return False

    def _read_brpop(self) -> None:
        reply = self._blocking.read_response()
        self._brpop_sent_at = None
        if not reply:
            return
        key, raw = reply
        key = _text(key)
        queue = key[len(self._prefix):].split(self._channel.sep, 1)[0]
        if not self._consuming or queue not in self._queues:
            # Cancelled while the BRPOP was out: the message goes back to
            # the end it was popped from, untouched.
            self._client.rpush(key, raw)
            return
        try:
            self._fetch_batch(max(1, self._room()), popped=raw)
        except self.connection_errors:
            self._push_back(key, raw)
            raise

    def _push_back(self, key: str, raw: bytes) -> None:
        try:
            self._client.rpush(key, raw)
        except Exception:
            logger.critical("Lost a message popped from %s: the connection failed before "
                            "it was leased: %.200r", key, raw, exc_info=True)

    def _kombu_sockets(self) -> list[Any]:
        cycle = getattr(self.connection.transport, "cycle", None)
        socks = getattr(cycle, "_chan_to_sock", None) or {}
        return [sock for sock in socks.values() if sock is not None and sock.fileno() >= 0]
