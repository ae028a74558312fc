"""The threads pool under remote control: terminate, grow, shrink; and the
consumer's prefetch count following the pool's slot count.

Real threads run tasks of an in-memory app; what a run stores goes to a
recording store, so a terminated run is seen not to write its result.
Wire behaviour against ``celery worker`` is in tests/interop/
(test_terminate.py, test_pool_controls.py).
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from celery import Celery

from celerycompat.consumer.consumer import Consumer
from celerycompat.consumer.decoder import make_decoder
from celerycompat.execution.outcome import State
from celerycompat.execution.runner import RunSettings, TaskRunner
from celerycompat.pools.threads import ThreadPool
from celerycompat.protocol.message import TaskMessage


class RecordingStore:
    def __init__(self, backend):
        self.backend = backend
        self.done: list = []

    def mark_as_done(self, task_id, *args, **kwargs):
        self.done.append(task_id)

    def mark_as_started(self, *args, **kwargs):
        pass

    mark_as_failure = mark_as_retry = mark_as_revoked = mark_as_started


@pytest.fixture
def app():
    app = Celery(f"t{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://",
                 set_as_current=False)
    app.finally_ran = []

    @app.task(name="t.busy", shared=False, bind=True)
    def busy(self, seconds):
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                pass
        finally:
            app.finally_ran.append(self.request.id)
        return "done"

    app.unblock = threading.Event()

    @app.task(name="t.stuck", shared=False)
    def stuck():
        app.unblock.wait()  # a C-level wait: an unwind lands only when it returns
        return "unblocked"

    @app.task(name="t.add", shared=False)
    def add(x, y):
        return x + y

    app.finalize()
    return app


@pytest.fixture
def pool_and_store(app):
    stores: list = []

    def store_for(app, backend):
        store = RecordingStore(backend)
        stores.append(store)
        return store

    pool = ThreadPool(TaskRunner(app, RunSettings(hostname="t@h"), store_for), 2)
    pool.start()
    yield pool, stores
    pool.stop(wait=False)


def message(task: str, args=()) -> TaskMessage:
    task_id = str(uuid.uuid4())
    request = {"id": task_id, "task": task, "retries": 0, "args": list(args),
               "kwargs": {}, "delivery_info": {}}
    return TaskMessage(task=task, id=task_id, name=task, args=list(args), kwargs={},
                       embed={"callbacks": None, "errbacks": None, "chain": None,
                              "chord": None},
                       request=request, delivery_info={})


def start(pool, msg) -> list:
    box: list = []
    pool.apply(msg.task, msg, box.append)
    return box


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_terminate_unwinds_the_run_and_a_new_thread_takes_the_slot(app, pool_and_store):
    pool, stores = pool_and_store
    msg = message("t.busy", (30,))
    box = start(pool, msg)
    assert wait_for(lambda: any(slot.job for slot in pool._slots))
    threads_before = {slot.thread for slot in pool._slots}
    assert pool.terminate(msg.id, 15) is True
    assert [outcome.state for outcome in box] == [State.REVOKED]  # reported at once
    assert wait_for(lambda: msg.id in app.finally_ran)  # unwound: its finally ran
    assert len(pool._slots) == 2 and {slot.thread for slot in pool._slots} != threads_before
    assert not any(msg.id in store.done for store in stores)  # its result never written
    results = [start(pool, message("t.add", (i, i))) for i in range(2)]
    assert wait_for(lambda: all(results))
    assert [r[0].state for r in results] == [State.SUCCESS] * 2
    assert pool.terminate(msg.id, 15) is False  # gone


def test_terminate_of_a_queued_job_drops_it_when_a_thread_picks_it_up(app, pool_and_store):
    pool, _ = pool_and_store
    busy = [start(pool, message("t.busy", (0.5,))) for _ in range(2)]
    queued = message("t.add", (1, 1))
    box = start(pool, queued)
    assert pool.terminate(queued.id, 9) is True
    assert wait_for(lambda: box) and box[0].state is State.REVOKED
    assert wait_for(lambda: all(busy)) and all(b[0].state is State.SUCCESS for b in busy)
    assert pool.terminate("no-such-task", 15) is False


def test_grow_and_shrink(app, pool_and_store):
    pool, _ = pool_and_store
    pool.grow(2)
    assert pool.info() == {"implementation": "celery.concurrency.thread:TaskPool",
                           "max-concurrency": 4, "threads": 4}
    busy = start(pool, message("t.busy", (0.5,)))
    pool.shrink(3)  # the idle threads leave at once, the busy one when it is done
    assert pool.limit == 1
    assert wait_for(lambda: busy and len(pool._slots) == 1)
    pool.shrink(5)  # never below zero
    assert pool.limit == 0 and wait_for(lambda: not pool._slots)
    pool.grow(1)
    box = start(pool, message("t.add", (2, 2)))
    assert wait_for(lambda: box) and box[0].state is State.SUCCESS


def test_prefetch_count_follows_the_pool(app):
    runner = TaskRunner(app, RunSettings(hostname="t@h"), lambda app, backend: None)
    pool = ThreadPool(runner, 2)
    consumer = Consumer(app=app, broker_factory=lambda: None, pool=pool, store=None, queues=[],
                        decode=make_decoder(["json"]), hostname="t@h", prefetch_multiplier=4)
    assert consumer.prefetch_count == 8
    pool.limit = 5  # as grow does
    assert consumer.prefetch_count == 20
    pool.limit = 0  # shrunk to nothing: never 0 (AMQP's "no limit")
    assert consumer.prefetch_count == 4
    consumer.prefetch_slots = 6  # --autoscale: the maximum, whatever the pool has
    assert consumer.prefetch_count == 24


def test_terminate_racing_the_end_of_a_run_reports_once(app, pool_and_store):
    """Terminate calls racing with the end of short runs: exactly one outcome each."""
    pool, _ = pool_and_store
    for _ in range(20):
        msg = message("t.busy", (0.01,))
        box = start(pool, msg)
        threads = [threading.Thread(target=pool.terminate, args=(msg.id, 15))
                   for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert wait_for(lambda box=box: box)
        time.sleep(0.05)
        assert len(box) == 1 and box[0].state in (State.REVOKED, State.SUCCESS)
    assert wait_for(lambda: len(pool._slots) == 2)


def test_abandoned_threads_are_bounded_and_slots_come_back(app, pool_and_store, caplog):
    """Runs taken over while blocked in C leave their threads behind: at most
    ``max_abandoned`` (the slot count) of them; past that a slot waits, with
    an ERROR line, and gets its thread when an abandoned one ends."""
    pool, _ = pool_and_store
    assert pool.max_abandoned == 2
    for n in range(3):
        msg = message("t.stuck")
        start(pool, msg)
        assert wait_for(lambda msg=msg: any(s.job and s.job[1].id == msg.id
                                            for s in pool._slots))
        assert pool.terminate(msg.id, 15) is True
        assert pool._abandoned == n + 1
    assert len(pool._slots) == 1 and pool._owed == 1  # the third slot waits
    assert "this slot waits for one of them to end" in caplog.text
    box = start(pool, message("t.add", (2, 3)))  # the remaining slot still serves
    assert wait_for(lambda: box) and box[0].state is State.SUCCESS
    app.unblock.set()
    assert wait_for(lambda: pool._abandoned == 0)
    assert wait_for(lambda: len(pool._slots) == 2) and pool._owed == 0
    results = [start(pool, message("t.add", (i, i))) for i in range(4)]
    assert wait_for(lambda: all(results))
