"""Rate limits: the bucket bookkeeping (pure, on a hand-driven clock) and the consumer's use of it.

The first part drives `RateLimits` with a fake clock: parsing as Celery
parses, the token schedule a capacity-one bucket gives, order, and what a
rate change does to waiting messages. The second runs the real consumer
loop, turn by turn on the test thread, over kombu's in-process
``memory://`` transport, for what the consumer does with waiting
messages: prefetch, ETA, revoke, warm shutdown, connection loss,
``worker_disable_rate_limits``. Wire behaviour against ``celery worker``
is in tests/interop/test_rate_limits.py.
"""

from __future__ import annotations

import math
import time
import uuid
from types import SimpleNamespace

import pytest
from celery import Celery
from celery.utils.time import rate as celery_rate
from hypothesis import given, settings
from hypothesis import strategies as st

from celerycompat.backends import result_store_for
from celerycompat.consumer.consumer import Consumer
from celerycompat.consumer.decoder import make_decoder
from celerycompat.consumer.kombu_broker import KombuBroker
from celerycompat.consumer.ratelimits import RateLimits, TokenBucket, parse_rate
from celerycompat.execution.runner import RunSettings, TaskRunner
from celerycompat.pools.threads import ThreadPool


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tasks(**rates):
    """A task registry stand-in: name -> object with ``rate_limit``."""
    return {name: SimpleNamespace(rate_limit=value) for name, value in rates.items()}


# -- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    ("10/s", 10.0), ("10", 10.0), (10, 10.0), (2.5, 2.5), ("100/m", 100 / 60),
    ("5/h", 5 / 3600), ("0.5/s", 0.5), ("1e3/m", 1000 / 60),
    (None, 0.0), ("", 0.0), (0, 0.0), ("0", 0.0), ("0/m", 0.0),
    ("-1/s", 0.0), ("nan", 0.0), ("inf/s", 0.0), ("-inf", 0.0),
])
def test_parse_rate_reads_celerys_spellings(value, expected):
    assert parse_rate(value) == pytest.approx(expected)


@pytest.mark.parametrize("value, error", [("abc/s", ValueError), ("10/x", KeyError),
                                          ("10/sec", KeyError), ("/s", ValueError)])
def test_parse_rate_fails_as_celery_does(value, error):
    with pytest.raises(error):
        parse_rate(value)
    with pytest.raises(error):
        celery_rate(value)


@given(st.one_of(
    st.text(max_size=12),
    st.from_regex(r"\A-?[0-9]{0,4}(\.[0-9]{0,3})?(e-?[0-9])?(/[smh]?)?\Z"),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-10**6, max_value=10**6),
))
def test_parse_rate_agrees_with_celery_on_any_input(value):
    """Same accepted values, same rate where it is a usable one, same exception type."""
    try:
        expected = celery_rate(value)
    except Exception as exc:  # noqa: BLE001 - whatever Celery raises, we raise too
        with pytest.raises(type(exc)):
            parse_rate(value)
        return
    expected = float(expected)
    got = parse_rate(value)
    if math.isfinite(expected) and expected > 0:
        assert got == expected
    else:
        assert got == 0.0


# -- the bucket ------------------------------------------------------------------------


def test_a_new_bucket_is_full_and_holds_one_token():
    bucket = TokenBucket(2.0, now=0.0)
    assert bucket.take(0.0)
    assert not bucket.take(0.0)
    assert bucket.seconds_to_token(0.0) == pytest.approx(0.5)
    assert not bucket.take(0.4)
    assert bucket.take(0.5)


def test_idle_time_is_not_banked():
    """Capacity one: after an hour idle, one message goes at once, the next waits."""
    bucket = TokenBucket(1.0, now=0.0)
    assert bucket.take(3600.0)
    assert not bucket.take(3600.0)
    assert bucket.seconds_to_token(3600.0) == pytest.approx(1.0)


def test_a_bucket_needs_a_positive_rate():
    with pytest.raises(ValueError):
        TokenBucket(0.0, now=0.0)


# -- the registry: schedule and order ----------------------------------------------------


def simulate(rate_per_type: dict,
             arrivals: list[tuple[float, str]]) -> list[tuple[float, str, int]]:
    """Run a registry as the consumer does, waking exactly when a token is due.

    ``arrivals``: (time, task name), in time order. Returns (release time,
    name, arrival index) for every item.
    """
    clock = Clock(0.0)
    limits: RateLimits[tuple[str, int]] = RateLimits(clock)
    limits.configure(tasks(**rate_per_type))
    released: list[tuple[float, str, int]] = []
    pending = list(enumerate(arrivals))
    while pending or len(limits):
        wait = limits.seconds_to_next()
        next_token = clock.now + wait if wait is not None else math.inf
        next_arrival = pending[0][1][0] if pending else math.inf
        clock.now = max(clock.now, min(next_token, next_arrival))
        # As the consumer's loop turn: waiting items first, then new deliveries.
        for name, index in limits.due():
            released.append((clock.now, name, index))
        while pending and pending[0][1][0] <= clock.now:
            index, (_, name) = pending.pop(0)
            if limits.admit(name, (name, index)):
                released.append((clock.now, name, index))
    return released


arrival_lists = st.lists(
    st.tuples(st.floats(min_value=0, max_value=50, allow_nan=False),
              st.sampled_from(["a", "b", "free"])),
    max_size=40,
).map(lambda items: sorted(items, key=lambda item: item[0]))


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0.05, max_value=500), st.floats(min_value=0.05, max_value=500),
       arrival_lists)
def test_each_type_goes_at_its_rate_in_arrival_order_and_never_waits_needlessly(
        rate_a, rate_b, arrivals):
    rates = {"a": rate_a, "b": rate_b}
    released = simulate({"a": rate_a, "b": rate_b, "free": None}, arrivals)
    assert sorted(index for _, _, index in released) == list(range(len(arrivals)))
    for name in ("a", "b", "free"):
        mine = [(at, index) for at, n, index in released if n == name]
        indexes = [index for _, index in mine]
        assert indexes == sorted(indexes), "a type's messages overtook one another"
        previous = None
        for at, index in mine:
            arrived = arrivals[index][0]
            if name == "free":
                assert at == arrived
            elif previous is None:
                # The bucket is full at start: the first never waits.
                assert at == pytest.approx(arrived)
            else:
                # The exact schedule of a capacity-one bucket: at arrival, or one
                # interval after the previous start, whichever is later.
                expected = max(arrived, previous + 1 / rates[name])
                assert at == pytest.approx(expected, rel=1e-9, abs=1e-6)
            previous = at


def test_waiting_items_come_out_oldest_first_and_the_wakeup_is_exact():
    clock = Clock(0.0)
    limits: RateLimits[str] = RateLimits(clock)
    limits.configure(tasks(t="2/s"))
    assert limits.admit("t", "first")
    assert not limits.admit("t", "second")
    assert not limits.admit("t", "third")
    assert limits.admit("other", "unlimited")
    assert len(limits) == 2 and limits.waiting() == ["second", "third"]
    assert limits.seconds_to_next() == pytest.approx(0.5)
    clock.now = 0.49
    assert limits.due() == []
    clock.now = 0.5
    assert limits.due() == ["second"]
    clock.now = 2.0
    assert limits.due() == ["third"]  # one token at a time, never a burst
    assert limits.seconds_to_next() is None and len(limits) == 0


def test_a_newcomer_does_not_take_the_token_of_a_waiting_message():
    clock = Clock(0.0)
    limits: RateLimits[str] = RateLimits(clock)
    limits.configure(tasks(t=1))
    assert limits.admit("t", "first")
    assert not limits.admit("t", "second")
    clock.now = 5.0  # the token is there, but "second" was first in line
    assert not limits.admit("t", "third")
    assert limits.due() == ["second"]


# -- the registry: reconfiguring (the rate_limit control command) ---------------------------


def test_an_unchanged_rate_keeps_its_bucket():
    clock = Clock(0.0)
    limits: RateLimits[str] = RateLimits(clock)
    registry = tasks(t="1/s", u="1/s")
    limits.configure(registry)
    assert limits.admit("t", "first")
    registry["u"].rate_limit = "5/s"
    assert limits.configure(registry) == []
    assert not limits.admit("t", "second"), "changing u must not refill t"


def test_a_new_rate_applies_to_waiting_messages():
    clock = Clock(0.0)
    limits: RateLimits[str] = RateLimits(clock)
    registry = tasks(t="1/h")
    limits.configure(registry)
    assert limits.admit("t", "first")
    assert not limits.admit("t", "second")
    assert not limits.admit("t", "third")
    registry["t"].rate_limit = "10/s"
    assert limits.configure(registry) == []
    assert limits.rate_of("t") == 10.0
    assert limits.due() == ["second"]  # a new bucket starts full
    assert limits.seconds_to_next() == pytest.approx(0.1)
    clock.now = 0.1
    assert limits.due() == ["third"]


@pytest.mark.parametrize("off", [None, "", 0, "0"])
def test_removing_a_limit_frees_the_waiting_messages_in_order(off):
    clock = Clock(0.0)
    limits: RateLimits[str] = RateLimits(clock)
    registry = tasks(t="1/h", u="1/h")
    limits.configure(registry)
    for item in ("t1", "t2", "t3"):
        limits.admit("t", item)
    limits.admit("u", "u1")
    limits.admit("u", "u2")
    registry["t"].rate_limit = off
    assert limits.configure(registry) == ["t2", "t3"]
    assert limits.waiting() == ["u2"] and len(limits) == 1
    assert limits.admit("t", "t4") and limits.rate_of("t") == 0.0


def test_an_invalid_rate_names_the_task():
    with pytest.raises(ValueError, match="proj.bad"):
        RateLimits(Clock()).configure(tasks(**{"proj.bad": "fast/s"}))


def test_clear_forgets_the_waiting_but_not_the_tokens():
    clock = Clock(0.0)
    limits: RateLimits[str] = RateLimits(clock)
    limits.configure(tasks(t="1/m"))
    limits.admit("t", "first")
    limits.admit("t", "second")
    assert limits.clear() == ["second"]
    assert len(limits) == 0 and limits.seconds_to_next() is None
    assert not limits.admit("t", "third"), "a reconnection does not refill the bucket"


# -- the consumer ------------------------------------------------------------------------------


@pytest.fixture
def app():
    app = Celery(f"t{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://",
                 set_as_current=False)
    app.conf.task_default_queue = f"q{uuid.uuid4().hex[:6]}"
    ran = []

    @app.task(name="t.hourly", rate_limit="1/h", shared=False)
    def hourly(n):
        ran.append(("hourly", n))
        return n

    @app.task(name="t.fast", rate_limit="20/s", shared=False)
    def fast(n):
        ran.append(("fast", n))
        return n

    @app.task(name="t.free", shared=False)
    def free(n):
        ran.append(("free", n))
        return n

    app.ran = ran
    return app


class Loop:
    """A consumer driven turn by turn on the test thread (no loop thread to race)."""

    def __init__(self, app, prefetch_multiplier: int = 1):
        app.finalize()
        self.app = app
        self.pool = ThreadPool(TaskRunner(app, RunSettings(hostname="t@h"), result_store_for), 1)
        self.pool.start()
        self.consumer = Consumer(
            app=app, broker_factory=lambda: KombuBroker(app.connection_for_read()),
            pool=self.pool, store=result_store_for(app),
            queues=list(app.amqp.queues.consume_from.values()),
            decode=make_decoder(app.conf.accept_content), hostname="t@h",
            prefetch_multiplier=prefetch_multiplier,
        )
        self.consumer.connect()

    def until(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "the condition never came"
            self.consumer._cycle()

    def idle(self) -> bool:
        consumer = self.consumer
        return not consumer.active and not consumer.reserved

    def queue_depth(self) -> int:
        with self.app.connection_for_write() as connection:
            name = self.app.conf.task_default_queue
            return connection.default_channel.queue_declare(name, passive=True).message_count

    def close(self) -> None:
        self.consumer.close()
        self.pool.stop()


@pytest.fixture
def loop(app):
    loop = Loop(app)
    yield loop
    loop.close()


def test_a_flood_of_a_limited_type_does_not_hold_up_other_tasks(app, loop):
    """One slot, prefetch 1: the free task still arrives behind twenty waiting messages."""
    for n in range(20):
        app.send_task("t.hourly", (n,))
    app.send_task("t.free", ("behind",))
    loop.until(lambda: ("free", "behind") in app.ran)
    consumer = loop.consumer
    assert app.ran == [("hourly", 0), ("free", "behind")]
    assert len(consumer.rate_limits) == 19
    assert consumer.prefetch_count == 1 + 19
    # Waiting messages are in no inspect list, as in Celery.
    assert consumer.reserved_requests() == [] and consumer.scheduled_requests() == []
    assert [r.args for r in consumer.rate_limited_requests()] == [[n] for n in range(1, 20)]


def test_a_token_is_taken_when_the_eta_comes_not_on_arrival(app, loop):
    app.send_task("t.hourly", ("eta",), countdown=0.3)
    app.send_task("t.hourly", ("now",))
    loop.until(lambda: ("hourly", "now") in app.ran and not loop.consumer._eta)
    # The ETA message found the token taken by the one that arrived after it.
    assert app.ran == [("hourly", "now")]
    assert [r.args for r in loop.consumer.rate_limited_requests()] == [["eta"]]
    assert loop.consumer.prefetch_count == 1 + 1


def test_a_revoked_waiting_message_is_discarded_when_its_token_comes(app, loop):
    first = app.send_task("t.fast", (1,))
    second = app.send_task("t.fast", (2,))
    third = app.send_task("t.fast", (3,))
    loop.until(lambda: len(loop.consumer.rate_limits) == 2)
    loop.consumer.revoked.add(second.id)
    loop.until(lambda: ("fast", 3) in app.ran and loop.idle())
    assert app.ran == [("fast", 1), ("fast", 3)]
    assert app.AsyncResult(second.id).state == "REVOKED"
    assert first.state == third.state == "SUCCESS"


def test_changing_the_rate_releases_waiting_messages(app, loop):
    for n in range(3):
        app.send_task("t.hourly", (n,))
    loop.until(lambda: len(loop.consumer.rate_limits) == 2)
    app.tasks["t.hourly"].rate_limit = None
    loop.consumer.reset_rate_limits()
    loop.until(lambda: len(app.ran) == 3 and loop.idle())
    assert app.ran == [("hourly", 0), ("hourly", 1), ("hourly", 2)]
    assert loop.consumer.prefetch_count == 1


def test_warm_shutdown_returns_waiting_messages_to_the_queue(app, loop):
    for n in range(4):
        app.send_task("t.hourly", (n,))
    loop.until(lambda: len(loop.consumer.rate_limits) == 3 and loop.idle())
    loop.consumer.stop_consuming()
    assert len(loop.consumer.rate_limits) == 0
    assert loop.queue_depth() == 3


def test_a_lost_connection_drops_the_waiting_copies(app, loop):
    for n in range(3):
        app.send_task("t.hourly", (n,))
    loop.until(lambda: len(loop.consumer.rate_limits) == 2 and loop.idle())
    generation = loop.consumer.generation
    loop.consumer._on_connection_lost(ConnectionError("gone"))
    assert loop.consumer.generation == generation + 1
    assert len(loop.consumer.rate_limits) == 0
    assert loop.consumer.prefetch_count == 1


def test_disabled_rate_limits_run_everything_at_once(app):
    app.conf.worker_disable_rate_limits = True
    loop = Loop(app)
    try:
        assert loop.consumer.rate_limits is None
        for n in range(3):
            app.send_task("t.hourly", (n,))
        loop.until(lambda: len(app.ran) == 3 and loop.idle())
        loop.consumer.reset_rate_limits()  # the control command: nothing to do
        assert loop.consumer.rate_limited_requests() == []
    finally:
        loop.close()


def test_annotations_reach_the_buckets(app):
    app.conf.task_annotations = {"t.free": {"rate_limit": "3/m"}}
    loop = Loop(app)
    try:
        assert loop.consumer.rate_limits.rate_of("t.free") == pytest.approx(3 / 60)
        assert loop.consumer.rate_limits.rate_of("t.fast") == 20.0
    finally:
        loop.close()


def test_prefetch_past_amqps_limit_asks_for_no_limit(app, loop, caplog):
    """kombu's QoS rule: a count over 65535 cannot be sent, so prefetch is switched off."""
    consumer = loop.consumer
    for n in range(70000):
        consumer.rate_limits.admit("t.hourly", n)
    with caplog.at_level("WARNING"):
        assert consumer._qos_value() == 0
        assert consumer._qos_value() == 0
    assert [r.getMessage() for r in caplog.records] == [
        "QoS: Disabled: prefetch_count exceeds 65535"]
    consumer.rate_limits.clear()
    assert consumer._qos_value() == 1
