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
