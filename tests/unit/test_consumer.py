"""The consumer loop over kombu's in-process ``memory://`` transport.

``memory://`` is real kombu (channels, QoS, acks), just without a server, so
these tests exercise the consumer's own logic: slots, settling, and what
happens when something below it breaks. Wire behaviour is covered by the
interop tests against real brokers.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid

import pytest
from celery import Celery

from celerycompat.consumer.consumer import Consumer
from celerycompat.consumer.decoder import make_decoder
from celerycompat.consumer.kombu_broker import KombuBroker
from celerycompat.execution.runner import RunSettings, TaskRunner
from celerycompat.pools.threads import ThreadPool


class BrokenStore:
    """A result store whose backend is down: every write raises."""

    def __init__(self, backend):
        self.backend = backend
        self.calls = 0

    def _fail(self, *args, **kwargs):
        self.calls += 1
        raise ConnectionError("result backend is down")

    mark_as_started = mark_as_done = mark_as_failure = mark_as_retry = _fail
    mark_as_revoked = _fail


@pytest.fixture
def app():
    app = Celery(f"t{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://",
                 set_as_current=False)
    app.conf.task_default_queue = f"q{uuid.uuid4().hex[:6]}"
    ran = []

    @app.task(name="t.record", shared=False)
    def record(n):
        ran.append(n)
        return n

    gate = threading.Event()

    @app.task(name="t.gated", shared=False)
    def gated(n):
        gate.wait(10)
        ran.append(n)
        return n

    app.ran = ran
    app.gate = gate
    app.finalize()
    return app


@contextlib.contextmanager
def running_consumer(app, store_type=None, pool_size=1, **options):
    """A consumer on its own thread over a ``pool_size``-slot thread pool,
    stopped on exit. Each result store made for it is a ``store_type`` over
    the backend (the backend itself without one), kept in ``consumer.stores``."""
    stores: list = []

    def store_for(app_, backend):
        stores.append(store_type(backend) if store_type else backend)
        return stores[-1]

    runner = TaskRunner(app, RunSettings(hostname="t@h"), store_for)
    pool = ThreadPool(runner, pool_size)
    pool.start()
    consumer = Consumer(
        app=app, broker_factory=lambda: KombuBroker(app.connection_for_read()),
        pool=pool, store=store_for(app, app.backend),
        queues=list(app.amqp.queues.consume_from.values()),
        decode=make_decoder(app.conf.accept_content), hostname="t@h",
        prefetch_multiplier=4, **options,
    )
    consumer.stores = stores
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        yield consumer
    finally:
        consumer.should_stop = True
        thread.join(5)
        pool.stop()


def late_task(app):
    """An ``acks_late`` task of its own, recording its argument in ``.ran``."""
    ran: list = []

    @app.task(name=f"t.late{uuid.uuid4().hex[:6]}", acks_late=True, shared=False)
    def late(n):
        ran.append(n)

    late.ran = ran
    return late


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_a_failing_result_store_does_not_lose_the_slot(app):
    with running_consumer(app, BrokenStore) as consumer:
        for n in range(3):
            app.send_task("t.record", (n,))
        # With one slot, the 2nd and 3rd task only run if the 1st gave it back.
        assert wait_for(lambda: app.ran == [0, 1, 2]), app.ran
        assert wait_for(lambda: not consumer.active)
        assert consumer.processed == 3


@pytest.mark.parametrize("limit, expected", [(None, 4 + 10), (6, 6), (2, 2)])
def test_worker_eta_task_limit_caps_the_prefetch_count(app, limit, expected):
    """Each held ETA message raises the prefetch count by one (B12), but never
    past ``worker_eta_task_limit``: what bounds memory with a huge ETA backlog."""
    app.conf.worker_eta_task_limit = limit
    with running_consumer(app) as consumer:
        for n in range(10):
            app.send_task("t.record", (n,), countdown=3600)
        assert wait_for(lambda: len(consumer.scheduled_requests()) >= min(10, expected))
        time.sleep(0.2)
        assert consumer.prefetch_count == expected
        assert len(consumer.scheduled_requests()) == min(10, expected)


@pytest.mark.parametrize("pool_size", [1, 2])
def test_disable_prefetch_leaves_messages_for_busy_slots_in_the_queue(app, pool_size):
    """``--disable-prefetch`` on a pulling (virtual) transport: with every slot
    busy nothing is fetched; the rest wait in the queue, not in the worker."""
    try:
        with running_consumer(app, pool_size=pool_size, disable_prefetch=True) as consumer:
            for n in range(pool_size + 3):
                app.send_task("t.gated", (n,))
            assert wait_for(lambda: len(consumer.active) == pool_size)
            time.sleep(0.3)  # a prefetch, were there going to be one
            assert len(consumer.reserved) == 0
            with app.connection_for_read() as conn:
                queue = app.amqp.queues[app.conf.task_default_queue].bind(conn.default_channel)
                assert queue.queue_declare(passive=True).message_count == 3
            app.gate.set()
            assert wait_for(lambda: sorted(app.ran) == list(range(pool_size + 3))), app.ran
    finally:
        app.gate.set()


class DeferringStore:
    """Defers every SUCCESS write, as the Redis store does under group commit,
    with the write's completion in the test's hands."""

    def __init__(self, backend):
        self.backend = backend
        self.writes: list = []

    def mark_as_done(self, task_id, result, request=None, store_result=True, **kwargs):
        from concurrent.futures import Future

        from celerycompat.backends import group_commit

        future = Future()
        self.writes.append(future)
        group_commit.add_pending(future)

    def mark_as_started(self, *args, **kwargs):
        pass


def test_a_deferred_success_frees_the_slot_but_holds_the_ack(app):
    """Group commit: the next task may start while a SUCCESS is being written,
    but the message of an acks_late task is acked only once it is written,
    and a warm shutdown waits for it (``has_work``)."""
    late = late_task(app)
    with running_consumer(app, DeferringStore) as consumer:
        late.delay(1)
        late.delay(2)
        # One slot, yet both ran: the first write is still pending.
        assert wait_for(lambda: late.ran == [1, 2])
        writes = consumer.stores[-1].writes
        assert wait_for(lambda: len(writes) == 2)
        time.sleep(0.1)
        assert consumer.processed == 0 and consumer.has_work()
        qos = consumer.broker._channel.qos

        def unacked():
            return len(qos._delivered) - len(qos._dirty)

        assert unacked() == 2  # neither message acked yet
        writes[0].set_result(None)
        assert wait_for(lambda: consumer.processed == 1)
        assert wait_for(lambda: unacked() == 1)
        writes[1].set_result(None)
        assert wait_for(lambda: consumer.processed == 2 and not consumer.has_work())
        assert wait_for(lambda: unacked() == 0)


def test_a_new_connection_keeps_the_message_of_a_success_being_written(app):
    """Issue 19, item 2: a connection lost while an ``acks_late`` task's
    SUCCESS is being written. The task is no longer active, but its message
    is un-acked until the write lands: the new connection must keep it
    (``adopt``'s running deliveries), not give it back to the queue, where it
    was received again and ran a second time right after its result landed."""
    late = late_task(app)
    with running_consumer(app, DeferringStore) as consumer:
        late.delay(1)
        # The run's store is made on the slot's thread, after this line.
        assert wait_for(lambda: late.ran == [1] and len(consumer.stores[-1].writes) == 1)
        writes = consumer.stores[-1].writes
        assert wait_for(lambda: not consumer.active and consumer.has_work())
        handed = []

        def adopt(owed, running):
            handed.extend(running)
            return {delivery.handle.delivery_tag for delivery in running}

        consumer.broker.adopt = adopt
        consumer._adopt({"held": [], "acks": [], "requeues": []})
        assert [d.handle.delivery_tag for d in handed] == [
            r.delivery.handle.delivery_tag for r in consumer._awaiting_write.values()]
        assert len(handed) == 1
        writes[0].set_result(None)
        assert wait_for(lambda: consumer.processed == 1 and not consumer._awaiting_write)


def test_revoke_never_marks_a_success_still_being_written(app):
    """A ``revoke`` read while a finished task's SUCCESS write (group commit) is
    in flight must not store REVOKED: the backend still says PENDING, and
    Celery, which writes before it reads another control message, would have
    found SUCCESS. CI caught the REVOKED on solo (test_terminate.py)."""
    from types import SimpleNamespace

    from celerycompat.control import commands

    @app.task(name=f"t.quick{uuid.uuid4().hex[:6]}", shared=False)
    def quick():
        return 1

    marked = []
    backend = SimpleNamespace(get_state=lambda task_id: "PENDING",
                              mark_as_revoked=lambda task_id, **kw: marked.append(task_id))
    with running_consumer(app, DeferringStore) as consumer:
        task_id = quick.delay().id
        assert wait_for(lambda: len(consumer.stores[-1].writes) == 1)
        assert wait_for(lambda: not consumer.active)
        state = commands.ControlState(app=SimpleNamespace(backend=backend), hostname="t@h",
                                      consumer=consumer)
        commands.COMMANDS["revoke"](state, task_id=task_id)
        other = str(uuid.uuid4())
        commands.COMMANDS["revoke"](state, task_id=other)
        assert marked == [other]
        consumer.stores[-1].writes[0].set_result(None)
        assert wait_for(lambda: not consumer.has_work())
