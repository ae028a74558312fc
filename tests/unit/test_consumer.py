"""The consumer loop over kombu's in-process ``memory://`` transport.

``memory://`` is real kombu (channels, QoS, acks), just without a server, so
these tests exercise the consumer's own logic: slots, settling, and what
happens when something below it breaks. Wire behaviour is covered by the
interop tests against real brokers.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from celery import Celery

from celerycompat.consumer.consumer import Consumer
from celerycompat.consumer.kombu_broker import KombuBroker
from celerycompat.execution.runner import RunSettings, TaskRunner
from celerycompat.pools.threads import ThreadPool
from celerycompat.worker import make_decoder


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

    @app.task(name="t.record")
    def record(n):
        ran.append(n)
        return n

    app.ran = ran
    app.finalize()
    return app


def start_consumer(app, store_for, pool_size=1):
    runner = TaskRunner(app, RunSettings(hostname="t@h"), store_for)
    pool = ThreadPool(runner, pool_size)
    pool.start()
    consumer = Consumer(
        app=app, broker_factory=lambda: KombuBroker(app.connection_for_read()),
        pool=pool, store=store_for(app, app.backend),
        queues=list(app.amqp.queues.consume_from.values()),
        decode=make_decoder(app.conf.accept_content), hostname="t@h",
        prefetch_multiplier=4,
    )
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    return consumer, pool, thread


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_a_failing_result_store_does_not_lose_the_slot(app):
    stores = []

    def store_for(app_, backend):
        stores.append(BrokenStore(backend))
        return stores[-1]

    consumer, pool, thread = start_consumer(app, store_for, pool_size=1)
    try:
        for n in range(3):
            app.send_task("t.record", (n,))
        # With one slot, the 2nd and 3rd task only run if the 1st gave it back.
        assert wait_for(lambda: app.ran == [0, 1, 2]), app.ran
        assert wait_for(lambda: not consumer.active)
        assert consumer.processed == 3
    finally:
        consumer.should_stop = True
        thread.join(5)
        pool.stop()
