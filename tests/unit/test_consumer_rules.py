"""The consumer's rules over an in-memory broker (tests/unit/memory_broker.py).

Prefetch, ETA holds, revokes, the settling order of ``acks_late`` and the
warm shutdown, each in well under a second: the broker is a `Broker` in
memory, the pool a real threads pool, results in Celery's in-memory cache
backend. What crosses the wire is the interop suite's (against
``celery worker`` on real brokers); these pin the consumer's own logic.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from celery import Celery
from memory_broker import MemoryBroker
from test_consumer import wait_for

from celerycompat.backends import result_store_for
from celerycompat.consumer.consumer import Consumer
from celerycompat.consumer.decoder import make_decoder
from celerycompat.execution.runner import RunSettings, TaskRunner
from celerycompat.pools.threads import ThreadPool


@pytest.fixture
def app():
    app = Celery(f"t{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://",
                 set_as_current=False)
    app.gate = threading.Event()
    app.ran = []

    @app.task(name="t.gated", shared=False)
    def gated(n):
        app.gate.wait(10)
        app.ran.append(n)
        return n

    @app.task(name="t.late", shared=False, acks_late=True)
    def late(n):
        app.ran.append(n)
        return n

    @app.task(name="t.late_gated", shared=False, acks_late=True)
    def late_gated(n):
        app.gate.wait(10)
        app.ran.append(n)
        return n

    app.finalize()
    return app


@pytest.fixture
def run(app):
    """``run(slots=1, multiplier=1)``: a consumer on a fresh MemoryBroker, its thread running."""
    started = []

    def start(slots: int = 1, multiplier: int = 1):
        broker = MemoryBroker()
        runner = TaskRunner(app, RunSettings(hostname="t@h"), result_store_for)
        pool = ThreadPool(runner, slots)
        pool.start()
        consumer = Consumer(
            app=app, broker_factory=lambda: broker, pool=pool,
            store=result_store_for(app), queues=["celery"],
            decode=make_decoder(app.conf.accept_content), hostname="t@h",
            prefetch_multiplier=multiplier)
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        started.append((consumer, pool, thread))
        return broker, consumer, thread

    yield start
    app.gate.set()
    for consumer, pool, thread in started:
        consumer.should_stop = True
        thread.join(5)
        pool.stop()


def test_prefetch_holds_slots_times_multiplier_besides_the_running_task(app, run):
    """B34: one slot, multiplier 2: the running task (acked at its start) and
    two reserved messages; the other two stay in the queue."""
    broker, consumer, _ = run(slots=1, multiplier=2)
    ids = [broker.publish(app, "t.gated", (n,)) for n in range(5)]
    assert wait_for(lambda: len(consumer.active) == 1 and len(consumer.reserved) == 2)
    time.sleep(0.05)  # nothing more comes
    assert broker.waiting() == 2 and len(broker.unacked) == 2
    assert broker.settled(ids[0]) == ["ack"]  # early ack: at the start
    app.gate.set()
    assert wait_for(lambda: app.ran == [0, 1, 2, 3, 4])


def test_an_eta_task_is_held_unacked_and_raises_the_prefetch_count(app, run):
    """B12: a countdown task waits in the worker, un-acked, with one more
    prefetch slot for it; it runs when due."""
    broker, consumer, _ = run(slots=1, multiplier=1)
    app.gate.set()
    held = broker.publish(app, "t.gated", ("eta",), countdown=0.3)
    assert wait_for(lambda: consumer.prefetch_count == 2)
    now = broker.publish(app, "t.gated", ("now",))
    assert wait_for(lambda: app.ran == ["now"])
    assert broker.settled(held) == [] and held not in app.ran
    assert wait_for(lambda: app.ran == ["now", "eta"])
    assert broker.settled(now) == ["ack"] and broker.settled(held) == ["ack"]


def test_a_revoked_task_is_acked_not_run_and_stored_revoked(app, run):
    broker, consumer, _ = run()
    task_id = str(uuid.uuid4())
    consumer.revoked.add(task_id)
    broker.publish(app, "t.gated", (1,), task_id=task_id)
    assert wait_for(lambda: broker.settled(task_id) == ["ack"])
    assert app.ran == []
    assert app.AsyncResult(task_id).state == "REVOKED"


def test_acks_late_is_acked_after_its_result_is_stored(app, run):
    broker, consumer, _ = run()
    seen_at_ack = []
    ack = broker.ack

    def ack_seeing_the_result(delivery):
        seen_at_ack.append(app.AsyncResult(delivery.headers["id"]).state)
        ack(delivery)

    broker.ack = ack_seeing_the_result
    task_id = broker.publish(app, "t.late", (7,))
    assert wait_for(lambda: broker.settled(task_id) == ["ack"])
    assert seen_at_ack == ["SUCCESS"] and app.ran == [7]


def test_warm_shutdown_returns_reserved_messages_and_finishes_the_running_one(app, run):
    """G9: deliveries stop, the reserved message goes back to the queue at
    once, the running task finishes and is settled."""
    broker, consumer, thread = run(slots=1, multiplier=1)
    running = broker.publish(app, "t.gated", ("running",))
    reserved = broker.publish(app, "t.gated", ("reserved",))
    assert wait_for(lambda: len(consumer.active) == 1 and len(consumer.reserved) == 1)
    # What Worker.shutdown does once the loop has stopped.
    consumer.should_stop = True
    thread.join(5)
    consumer.stop_consuming()
    assert broker.settled(reserved) == ["requeue"] and broker.waiting() == 1
    app.gate.set()
    deadline = time.monotonic() + 5
    while consumer.has_work() and time.monotonic() < deadline:
        consumer.drain(0.05)
    assert app.ran == ["running"] and broker.settled(running) == ["ack"]


def test_an_expired_task_is_acked_not_run_and_stored_revoked(app, run):
    """A message past its ``expires`` is discarded when received, as Celery does."""
    broker, consumer, _ = run()
    task_id = broker.publish(app, "t.late", (1,), expires=-1)
    assert wait_for(lambda: broker.settled(task_id) == ["ack"])
    assert app.ran == []
    assert app.AsyncResult(task_id).state == "REVOKED"


def test_a_busy_pool_waits_for_its_tasks_not_for_the_broker(app, run):
    """``acks_late`` with prefetch 1: the running task fills the window, so
    the broker has nothing to deliver until that task is settled. While every
    slot is busy the consumer must wait for the task to end and poll the
    broker without waiting; it used to block on the broker for its whole
    poll timeout after each task (26 ms a task instead of 2)."""
    broker, consumer, _ = run(slots=1, multiplier=1)
    polls = []
    poll = broker.poll

    def recording_poll(timeout):
        polls.append((timeout, consumer.running_count() >= consumer.pool.limit))
        poll(timeout)

    broker.poll = recording_poll
    for n in range(3):
        broker.publish(app, "t.late_gated", (n,))
    assert wait_for(lambda: consumer.running_count() == 1)
    time.sleep(0.2)  # the consumer turns meanwhile
    app.gate.set()
    assert wait_for(lambda: app.ran == [0, 1, 2])
    assert any(busy for _, busy in polls)
    assert [timeout for timeout, busy in polls if busy and timeout] == []


class _TakenAheadPool(ThreadPool):
    """A pool holding a job ahead of its one slot that it can no longer give
    back: as a prefork child that took its job while the consumer was
    taking the waiting ones back."""

    @property
    def queue_ahead(self) -> int:
        return self.limit

    def withdraw(self, messages):
        return []

    def terminate(self, task_id: str, signum: int) -> bool:
        self.terminated.append(task_id)
        return super().terminate(task_id, signum)


def test_connection_loss_cancels_a_late_task_a_slot_took_from_the_waiting_ones(app):
    """``worker_cancel_long_running_tasks_on_connection_loss``: the waiting
    jobs are taken back first, and one the pool kept (a child took it
    meanwhile) runs, so it is cancelled with the running one. The cancel
    used to come first and skip every waiting job, so that one ran on
    while its message went back to the broker."""
    app.conf.worker_cancel_long_running_tasks_on_connection_loss = True
    broker = MemoryBroker()
    runner = TaskRunner(app, RunSettings(hostname="t@h"), result_store_for)
    pool = _TakenAheadPool(runner, 1)
    pool.terminated = []
    pool.start()
    consumer = Consumer(
        app=app, broker_factory=lambda: broker, pool=pool, store=result_store_for(app),
        queues=["celery"], decode=make_decoder(app.conf.accept_content), hostname="t@h",
        prefetch_multiplier=2)
    thread = threading.Thread(target=consumer.run, daemon=True)
    thread.start()
    try:
        ids = [broker.publish(app, "t.late_gated", (n,)) for n in range(2)]
        assert wait_for(lambda: consumer.running_count() == 1 and len(consumer._waiting) == 1)
        poll = broker.poll

        def lose_once(timeout):
            broker.poll = poll
            raise ConnectionError("lost")

        broker.poll = lose_once
        assert wait_for(lambda: len(pool.terminated) == 2)
        assert sorted(pool.terminated) == sorted(ids)
    finally:
        app.gate.set()
        consumer.should_stop = True
        thread.join(5)
        pool.stop()


def test_a_cold_shutdown_cancels_running_tasks_as_celery_55(app, run, monkeypatch):
    """Celery >= 5.5 sends ``task-cancelled`` for each running task a cold
    shutdown ends (early ack, or ``acks_late`` not acked yet); not for a task
    still waiting for a slot, and not before 5.5."""
    from celerycompat.consumer import controls

    broker, consumer, _ = run(slots=2, multiplier=1)
    cancelled = []

    class Heard:
        def cancelled(self, request):
            cancelled.append(request.message.name)

    consumer.observe(Heard())
    broker.publish(app, "t.gated", (1,))
    broker.publish(app, "t.late_gated", (2,))
    assert wait_for(lambda: consumer.running_count() == 2)
    monkeypatch.setattr(controls, "cancels_on_cold_shutdown", lambda: False)
    consumer.cancel_on_cold_shutdown()
    assert cancelled == []
    monkeypatch.setattr(controls, "cancels_on_cold_shutdown", lambda: True)
    consumer.cancel_on_cold_shutdown()
    assert sorted(cancelled) == ["t.gated", "t.late_gated"]
