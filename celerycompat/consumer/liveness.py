"""The broker liveness watchdog: a connection that stopped answering is broken on purpose.

A broker that vanishes without closing its TCP connections (a host that
died, a NAT or firewall entry that expired, a failover behind a load
balancer) leaves the worker with half-open sockets: writes still succeed,
nothing ever comes back. A socket error never arrives, so reconnecting "on
connection errors" never starts, and the worker sits there without
consuming: one road to the "worker stops consuming after a broker problem"
reports Celery keeps getting (#8030, #9054, #10205, #10302). The consumer
blocks for good in any synchronous broker call: on Redis every command
waits for its reply with no timeout (kombu's default ``socket_timeout`` is
None), on AMQP so do ``basic.qos``, ``queue.declare`` and ``basic.cancel``.

AMQP heartbeats and the Redis adapter's BRPOP deadline notice silence while
the consumer *waits*; this watchdog covers the rest. The consumer thread
arms it around every broker call (`Watchdog.guard`) with a budget: the
call's own wait plus `liveness_timeout()`. A thread of its own checks once a
second; a call still running past its budget gets its connection broken
(every socket ``shutdown()``), so the blocked read returns, the call raises
a connection error, and the consumer reconnects as for any other loss. The
watchdog never judges task code: only calls made inside ``guard`` count.

``CCWORKER_BROKER_LIVENESS_TIMEOUT`` (seconds, default 30; 0 turns the
watchdog off) is the budget's margin. It is deliberately generous: a broker
that is slow but alive should never be disconnected.
"""

from __future__ import annotations

import functools
import logging
import os
import select
import socket
import threading
import time
from typing import Any, Callable, Iterable

logger = logging.getLogger("celery.worker.consumer.consumer")

DEFAULT_TIMEOUT = 30.0
ENV = "CCWORKER_BROKER_LIVENESS_TIMEOUT"


def liveness_timeout() -> float:
    """The margin given to every broker call (0: no watchdog)."""
    raw = os.environ.get(ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_TIMEOUT
    except ValueError:
        logger.warning("%s=%r is not a number; using %g s", ENV, raw, DEFAULT_TIMEOUT)
        return DEFAULT_TIMEOUT
    return max(0.0, value)


class Watchdog:
    """Breaks the connection of a guarded call that overran its budget.

    One consumer thread arms it at a time (guards do not nest: an inner
    guard leaves the outer deadline in place). The check thread starts with
    the first guard and is a daemon: it never keeps the process alive.

    Args:
        timeout: the margin added to every guarded call's own wait; 0 turns
            guarding off (``guard`` is then a no-op).
        interval: how often the deadline is checked.
        clock: monotonic seconds (injected by the tests).
    """

    def __init__(self, timeout: float, interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self.interval = interval
        self._clock = clock
        #: (deadline, breaker, what) of the call in progress, or None.
        self._armed: tuple[float, Callable[[], None], str] | None = None
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.fired = 0

    def guard(self, breaker: Callable[[], None], what: str, wait: float = 0.0) -> _Guard:
        """``with watchdog.guard(breaker, "poll", wait=timeout): ...``

        ``breaker`` is called (from the watchdog's thread) if the block is
        still running ``wait + timeout`` seconds after it began.
        """
        return _Guard(self, breaker, what, wait)

    def check(self) -> bool:
        """Break the guarded call's connection if it overran; True if it did."""
        armed = self._armed
        if armed is None or self._clock() < armed[0]:
            return False
        deadline, breaker, what = armed
        with self._lock:
            if self._armed is not armed:
                return False  # the call ended meanwhile
            self._armed = None  # break once
        self.fired += 1
        logger.warning("consumer: the broker did not answer (%s) within %.0f s: "
                       "closing the connection to re-establish it", what, self.timeout)
        try:
            breaker()
        except Exception:
            logger.debug("breaking the broker connection failed", exc_info=True)
        return True

    def _arm(self, wait: float, breaker: Callable[[], None], what: str) -> bool:
        if self.timeout <= 0 or self._armed is not None:
            return False
        self._armed = (self._clock() + wait + self.timeout, breaker, what)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="broker-liveness",
                                            daemon=True)
            self._thread.start()
        return True

    def _disarm(self) -> None:
        with self._lock:
            self._armed = None

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self.check()


class _Guard:
    """The context manager `Watchdog.guard` returns (a class: cheaper than a generator)."""

    __slots__ = ("dog", "breaker", "what", "wait", "armed")

    def __init__(self, dog: Watchdog, breaker: Callable[[], None], what: str,
                 wait: float) -> None:
        self.dog, self.breaker, self.what, self.wait = dog, breaker, what, wait
        self.armed = False

    def __enter__(self) -> _Guard:
        self.armed = self.dog._arm(self.wait, self.breaker, self.what)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.armed:
            self.dog._disarm()


_watchdog: Watchdog | None = None
_watchdog_lock = threading.Lock()


def watchdog() -> Watchdog:
    """The process's watchdog (one consumer thread per worker process)."""
    global _watchdog
    if _watchdog is None:
        with _watchdog_lock:
            if _watchdog is None:
                _watchdog = Watchdog(liveness_timeout())
    return _watchdog


# -- finding and breaking a kombu connection's sockets -------------------------


def kombu_sockets(connection: Any) -> list[socket.socket]:
    """Every open socket of a kombu ``Connection``: py-amqp's, or each Redis channel's pools."""
    if connection is None:
        return []
    socks: list[Any] = []
    transport = getattr(connection, "_connection", None)
    sock = amqp_socket(connection)
    if sock is not None:
        socks.append(sock)
    # Virtual transports (Redis): the transport object holds the channels.
    channels = [*(getattr(transport, "channels", None) or []),
                *(getattr(transport, "_avail_channels", None) or [])]
    for channel in channels:
        for pool_name in ("_pool", "_async_pool"):
            socks.extend(redis_pool_sockets(getattr(channel, pool_name, None)))
        for conn_name in ("_in_poll", "_in_listen"):
            held = getattr(channel, conn_name, None)
            socks.append(getattr(held, "_sock", None))
        subclient = getattr(channel, "_subclient", None)
        socks.append(getattr(getattr(subclient, "connection", None), "_sock", None))
    return _unique(socks)


def amqp_socket(connection: Any) -> Any:
    """A kombu ``Connection``'s py-amqp socket, or None (another transport, closed).

    py-amqp has one socket per connection, read here from its socket
    transport (``_transport``): ``Connection.sock`` goes through
    ``.transport``, which on a collected connection warns
    (``AMQPDeprecationWarning``) and connects again.
    """
    transport = getattr(connection, "_connection", None)
    return getattr(getattr(transport, "_transport", None), "sock", None)


def redis_pool_sockets(pool: Any) -> list[Any]:
    """The sockets of a redis-py connection pool, idle and in use."""
    if pool is None:
        return []
    conns: list[Any] = []
    for name in ("_available_connections", "_in_use_connections", "_connections"):
        held = getattr(pool, name, None)
        if held:
            conns.extend(list(held))
    return [getattr(conn, "_sock", None) for conn in conns]


def break_sockets(socks: Iterable[Any]) -> int:
    """``shutdown()`` each socket: a blocked read on it returns at once.

    The sockets are not closed (their owners do that, and a file descriptor
    closed under a running read could be reused by another connection).
    """
    broken = 0
    for sock in socks:
        if sock is None:
            continue
        try:
            sock.shutdown(socket.SHUT_RDWR)
            broken += 1
        except (OSError, ValueError):
            pass
    return broken


def readable(socks: Iterable[Any], timeout: float) -> list[Any]:
    """The sockets among ``socks`` with data to read within ``timeout`` seconds.

    ``poll`` rather than ``select``: a worker holding more than 1024 file
    descriptors (gevent with many connections, a test process) would make
    ``select`` fail with "filedescriptor out of range". Under gevent's monkey
    patching ``poll`` is gone and ``select`` is gevent's own, which has no
    such limit.
    """
    if not hasattr(select, "poll"):
        return select.select(list(socks), [], [], timeout)[0]
    poller = select.poll()
    by_fd = {}
    for sock in socks:
        fd = sock.fileno()
        by_fd[fd] = sock
        poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
    return [by_fd[fd] for fd, _ in poller.poll(max(0, int(timeout * 1000 + 0.999)))]


def _unique(socks: Iterable[Any]) -> list[Any]:
    seen: dict[int, Any] = {}
    for sock in socks:
        if sock is not None:
            seen.setdefault(id(sock), sock)
    return list(seen.values())


def guarded(what: str, waits: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a broker adapter method: it runs under the watchdog.

    The adapter provides ``break_connection()``. ``waits``: the method's
    first argument is how long it may legitimately wait (``poll(timeout)``),
    added to the budget.
    """

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def run_guarded(self: Any, *args: Any, **kwargs: Any) -> Any:
            wait = float(args[0]) if waits and args else 0.0
            with watchdog().guard(self.break_connection, what, wait):
                return method(self, *args, **kwargs)

        return run_guarded

    return decorate
