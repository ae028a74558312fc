"""The broker liveness watchdog (consumer/liveness.py): budgets, breaking, sockets.

The clock is injected, so nothing here waits for real time except the
socketpair test, which shows that a read blocked on a socket the watchdog
breaks returns at once.
"""

from __future__ import annotations

import socket
import threading

import pytest

from celerycompat.consumer import liveness
from celerycompat.consumer.liveness import Watchdog, break_sockets


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def test_a_call_within_its_budget_is_left_alone(clock):
    broken = []
    dog = Watchdog(5.0, clock=clock)
    with dog.guard(lambda: broken.append(1), "poll", wait=0.5):
        clock.now += 5.4
        assert dog.check() is False
    assert broken == []


def test_a_call_past_its_budget_gets_its_connection_broken_once(clock):
    broken = []
    dog = Watchdog(5.0, clock=clock)
    with dog.guard(lambda: broken.append(1), "poll", wait=0.5):
        clock.now += 5.6
        assert dog.check() is True
        clock.now += 10
        assert dog.check() is False  # once per call
    assert broken == [1]
    assert dog.fired == 1


def test_after_the_call_nothing_is_armed(clock):
    broken = []
    dog = Watchdog(5.0, clock=clock)
    with dog.guard(lambda: broken.append(1), "ack"):
        pass
    clock.now += 60
    assert dog.check() is False
    assert broken == []


def test_guards_do_not_nest_the_outer_deadline_stands(clock):
    broken = []
    dog = Watchdog(5.0, clock=clock)
    with dog.guard(lambda: broken.append("outer"), "poll", wait=1.0):
        clock.now += 3
        with dog.guard(lambda: broken.append("inner"), "ack"):
            clock.now += 3.5  # 6.5 s into the outer call, 3.5 into the inner
            assert dog.check() is True
    assert broken == ["outer"]


def test_zero_timeout_turns_the_watchdog_off(clock):
    broken = []
    dog = Watchdog(0.0, clock=clock)
    with dog.guard(lambda: broken.append(1), "poll"):
        clock.now += 3600
        assert dog.check() is False
    assert broken == []


def test_a_failing_breaker_does_not_kill_the_watchdog(clock):
    dog = Watchdog(1.0, clock=clock)

    def breaker() -> None:
        raise OSError("already closed")

    with dog.guard(breaker, "poll"):
        clock.now += 2
        assert dog.check() is True


@pytest.mark.parametrize("raw, expected", [
    ("", liveness.DEFAULT_TIMEOUT), ("7.5", 7.5), ("0", 0.0), ("-3", 0.0),
    ("soon", liveness.DEFAULT_TIMEOUT),
])
def test_the_timeout_comes_from_the_environment(monkeypatch, raw, expected):
    monkeypatch.setenv(liveness.ENV, raw)
    assert liveness.liveness_timeout() == expected


def test_guarded_methods_run_under_the_watchdog(monkeypatch, clock):
    dog = Watchdog(5.0, clock=clock)
    monkeypatch.setattr(liveness, "_watchdog", dog)
    seen = []

    class Adapter:
        def break_connection(self) -> None:
            seen.append("broken")

        @liveness.guarded("poll", waits=True)
        def poll(self, timeout: float) -> str:
            seen.append(dog._armed[0] - clock.now)  # the budget it got
            return "polled"

    assert Adapter().poll(2.0) == "polled"
    assert seen == [7.0]
    assert dog._armed is None


def test_breaking_a_socket_wakes_a_blocked_read():
    """What the watchdog relies on: shutdown() ends a recv() blocked in another thread."""
    ours, peer = socket.socketpair()
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(ours.recv(10)))
    try:
        reader.start()
        reader.join(0.2)
        assert reader.is_alive()  # blocked: the peer never writes
        assert break_sockets([ours, None]) == 1
        reader.join(5)
        assert not reader.is_alive()
        assert got == [b""]
    finally:
        ours.close()
        peer.close()


def test_breaking_a_closed_socket_is_harmless():
    sock = socket.socket()
    sock.close()
    assert break_sockets([sock]) == 0


def test_the_event_connection_being_set_up_is_within_the_breakers_reach():
    """A broker that goes silent while the event connection opens its channel
    (a wait without a timeout) must leave the watchdog's breaker something
    to break: the connection is the dispatcher's from the moment it exists.
    Before, it was stored only once set up, and the consumer thread hung."""
    from types import SimpleNamespace

    from celerycompat.events.dispatcher import EventDispatcher

    seen = []

    class Connection:
        transport = SimpleNamespace(driver_type="amqp")

        def ensure_connection(self, max_retries=None):
            seen.append(("connect", dispatcher._connection is self))

        @property
        def default_channel(self):
            seen.append(("channel", dispatcher._connection is self))
            raise ConnectionError("the broker went silent; the breaker shut the socket")

        def release(self):
            seen.append(("released", dispatcher._connection is None))

    app = SimpleNamespace(clock=SimpleNamespace(), connection_for_write=Connection,
                          conf=SimpleNamespace(event_serializer="json", event_exchange="celeryev"))
    dispatcher = EventDispatcher(app, "w@h", task_events=True)
    assert dispatcher._ready() is False
    assert seen == [("connect", True), ("channel", True), ("released", True)]
    assert dispatcher._connection is None and dispatcher._producer is None


def test_sockets_of_a_collected_amqp_connection_are_read_without_reconnecting():
    """py-amqp's ``Connection.sock`` goes through ``.transport``, which on a
    connection without one (never connected, or collected after a loss) warns
    ``AMQPDeprecationWarning`` and connects: the watchdog must not do that."""
    import warnings
    from types import SimpleNamespace

    import amqp

    from celerycompat.consumer.liveness import kombu_sockets

    idle = amqp.Connection(host="127.0.0.1:1", connect_timeout=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kombu_sockets(SimpleNamespace(_connection=idle)) == []
    left, right = socket.socketpair()
    try:
        idle._transport = SimpleNamespace(sock=left)
        assert kombu_sockets(SimpleNamespace(_connection=idle)) == [left]
    finally:
        idle._transport = None
        left.close()
        right.close()


def test_the_amqp_socket_of_a_closed_connection_is_none_and_nothing_connects():
    """After the broker closed it, py-amqp has collected the connection
    (``_transport`` is None): reading its socket must neither warn
    (``AMQPDeprecationWarning`` about ``.transport``) nor connect again,
    which ``Connection.sock`` and kombu's ``Connection.connection`` both do."""
    import warnings

    from amqp import Connection as AmqpConnection
    from kombu import Connection

    from celerycompat.consumer.kombu_broker import KombuBroker

    conn = Connection("amqp://guest:guest@127.0.0.1:1//", connect_timeout=0.1)
    collected = AmqpConnection(host="127.0.0.1:1")  # no transport: as after collect()
    conn._connection = collected
    broker = KombuBroker(conn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert broker._amqp_socket() is None
        assert liveness.kombu_sockets(conn) == []
    assert conn._connection is collected
