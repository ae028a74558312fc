"""Keep held Redis messages leased: fresh ``unacked_index`` scores (issue 3, B12).

kombu's Redis transport emulates acks: a delivered message is copied into the
``unacked`` hash and its delivery tag scored with the delivery time in the
``unacked_index`` sorted set. Every consumer (ccworker or a stock Celery
worker) periodically "restores" entries scored older than
``visibility_timeout``, on the theory that their worker died. A worker that
legitimately holds a message longer (an ETA task, a long task under
``acks_late``) sees it restored and run a second time elsewhere (Celery
#2481, kombu #337).

The fix stays inside kombu's layout: while a worker holds a message it keeps
re-scoring it with the current time, so the score means "last seen alive"
rather than "delivered at". Restore logic in every consumer is untouched: a
dead worker stops refreshing, its scores age, and its messages come back after
``visibility_timeout`` exactly as before.

``ZADD XX`` only refreshes members that still exist, so a message that was
acked, or already restored by someone else, is never resurrected.

The refresh runs on a thread of its own, so it goes on while the consumer
thread is busy (a solo pool runs the task on it): reading the held tags is a
snapshot of a dict the consumer owns, retried if it changed underneath, and
the client is redis-py's (thread-safe, its own connection from the pool).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable

logger = logging.getLogger("celery.worker.consumer.connection")

#: Tags per ZADD, so 100,000 held messages never make one giant command.
CHUNK = 1000


def lease_interval(visibility_timeout: float) -> float:
    """How often to refresh: well inside the timeout, at least every minute.

    A quarter of the timeout leaves room for a missed refresh (Redis busy)
    and clock skew between hosts; the one-minute cap keeps the default
    one-hour timeout from hiding a stalled refresher for long.
    """
    return max(0.25, min(float(visibility_timeout) / 4.0, 60.0))


class LeaseKeeper:
    """Re-scores the tags a worker holds, every `interval` seconds.

    Args:
        client: a redis-py client (never a prefixing one: `index_key` is
            already the full key name, global key prefix included).
        index_key: the full name of kombu's ``unacked_index`` sorted set.
        visibility_timeout: the transport's timeout, in seconds.
    """

    def __init__(self, client: Any, index_key: str, visibility_timeout: float,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.index_key = index_key
        self.interval = lease_interval(visibility_timeout)
        self._clock = clock
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, tags: Callable[[], Iterable[Any]]) -> None:
        """Refresh ``tags()`` every `interval` on a daemon thread until `stop`."""
        self._thread = threading.Thread(target=self._run, args=(tags,),
                                        name="redis-lease", daemon=True)
        self._thread.start()

    def _run(self, tags: Callable[[], Iterable[Any]]) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.refresh(snapshot(tags))
            except Exception as exc:
                # The consumer notices a lost connection by itself; a
                # missed refresh is retried at the next interval.
                logger.debug("lease refresh failed: %r", exc)

    def stop(self) -> None:
        self._stopped.set()

    def refresh(self, tags: Iterable[Any]) -> int:
        """Score every tag in ``tags`` with now (``ZADD XX``), in chunks, one round trip."""
        now = self._clock()
        sent = 0
        chunk: dict[Any, float] = {}
        pipe = self.client.pipeline(transaction=False)
        for tag in tags:
            chunk[tag] = now
            if len(chunk) >= CHUNK:
                pipe.zadd(self.index_key, chunk, xx=True)
                sent += len(chunk)
                chunk = {}
        if chunk:
            pipe.zadd(self.index_key, chunk, xx=True)
            sent += len(chunk)
        if sent:
            pipe.execute()
        return sent


def snapshot(tags: Callable[[], Iterable[Any]]) -> list[Any]:
    """``list(tags())``, retried when the consumer thread changed the dict meanwhile."""
    for _ in range(10):
        try:
            return list(tags())
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return []


def plain_client(channel: Any) -> Any:
    """A redis-py client on a kombu Redis channel's pool, without key prefixing.

    Same server, credentials, TLS and Sentinel resolution as kombu's own
    client; key names given to it must already carry ``global_keyprefix``.
    """
    import redis

    return redis.Redis(connection_pool=channel.pool)


def redis_lease_for(channel: Any) -> LeaseKeeper | None:
    """The lease keeper for a kombu channel, or None when it is not Redis's."""
    # A virtual channel's ``connection`` is kombu's Transport.
    if getattr(channel.connection, "driver_type", None) != "redis":
        return None
    if not getattr(channel, "ack_emulation", True):
        return None
    index_key = (channel.global_keyprefix or "") + channel.unacked_index_key
    return LeaseKeeper(plain_client(channel), index_key, channel.visibility_timeout)
