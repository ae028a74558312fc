"""The project's own bootsteps (celerycompat/project_steps.py): order, parents, lifecycle.

No broker: the consumer is a stand-in with the attributes the runner reads,
and steps record what they are called with. What crosses the wire (a
``ConsumerStep``'s queue consumed on the worker's connection, reconnection)
is tested against ``celery worker`` in tests/interop/test_bootsteps.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery import Celery, bootsteps

from celerycompat.consumer.request import Request
from celerycompat.project_steps import (
    MissingPart,
    RequestSets,
    StepFailed,
    project_steps,
)

CALLS: list = []


class Early(bootsteps.StartStopStep):
    def __init__(self, parent, **kwargs):
        CALLS.append(("init", "Early", sorted(k for k in kwargs if k == "probe_file")))

    def start(self, parent):
        CALLS.append(("start", "Early"))

    def stop(self, parent):
        CALLS.append(("stop", "Early"))


class Late(bootsteps.StartStopStep):
    requires = (Early,)

    def start(self, parent):
        CALLS.append(("start", "Late"))

    def stop(self, parent):
        CALLS.append(("stop", "Late"))

    def terminate(self, parent):
        CALLS.append(("terminate", "Late"))


class Excluded(bootsteps.StartStopStep):
    def include_if(self, parent):
        return False

    def start(self, parent):  # pragma: no cover - must never run
        CALLS.append(("start", "Excluded"))


class OnConnection(bootsteps.StartStopStep):
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c):
        CALLS.append(("start", "OnConnection", c.connection))

    def stop(self, c):
        CALLS.append(("stop", "OnConnection"))

    def shutdown(self, c):
        CALLS.append(("shutdown", "OnConnection"))


class NeedsQos(bootsteps.StartStopStep):
    def start(self, c):
        c.qos.increment_eventually()


class Breaks(bootsteps.Step):
    def create(self, parent):
        raise ValueError("no")


def options(**user_options):
    return SimpleNamespace(nodename="w1@host", concurrency=2, loglevel="INFO", logfile=None,
                           pool="threads", queues=None, user_options=user_options)


def fake_consumer(app):
    return SimpleNamespace(app=app, hostname="w1@host", dispatcher=None, queues=[],
                           broker=SimpleNamespace(connection="conn-1"), exitcode=None,
                           should_stop=False)


def runner(worker_steps=(), consumer_steps=(), **user_options):
    app = Celery("steps", broker="memory://", set_as_current=False)
    for step in worker_steps:
        app.steps["worker"].add(step)
    for step in consumer_steps:
        app.steps["consumer"].add(step)
    consumer = fake_consumer(app)
    return project_steps(app, options(**user_options), "the-pool", consumer), consumer


@pytest.fixture(autouse=True)
def clear_calls():
    CALLS.clear()


def test_nothing_is_built_without_project_steps():
    assert runner()[0] is None


def test_worker_steps_run_in_dependency_order_and_stop_in_reverse():
    steps, _ = runner([Late, Early, Excluded], probe_file="/tmp/x")
    assert CALLS == [("init", "Early", ["probe_file"])]
    steps.start()
    steps.stop()
    assert CALLS[1:] == [("start", "Early"), ("start", "Late"), ("stop", "Late"),
                         ("stop", "Early")]


def test_a_cold_shutdown_terminates():
    steps, _ = runner([Late, Early])
    steps.start()
    steps.stop(cold=True)
    assert ("terminate", "Late") in CALLS and ("stop", "Late") not in CALLS


def test_consumer_steps_follow_the_connection():
    steps, consumer = runner(consumer_steps=[OnConnection])
    steps.start()
    steps.connected(None)
    steps.disconnected()
    consumer.broker = SimpleNamespace(connection="conn-2")
    steps.connected(None)
    steps.stop()
    steps.shutdown()
    assert CALLS == [("start", "OnConnection", "conn-1"), ("stop", "OnConnection"),
                     ("start", "OnConnection", "conn-2"), ("stop", "OnConnection"),
                     ("shutdown", "OnConnection")]


def test_a_missing_part_stops_the_worker_naming_it(caplog):
    steps, consumer = runner(consumer_steps=[NeedsQos])
    steps.connected(None)
    assert consumer.exitcode == 1 and consumer.should_stop
    assert "Unrecoverable error: MissingPart(\"ccworker's consumer has no 'qos'" in caplog.text


def test_a_step_failing_to_build_is_unrecoverable(caplog):
    with pytest.raises(StepFailed):
        runner([Breaks])
    assert "Unrecoverable error: ValueError('no')" in caplog.text


def test_parents_offer_the_common_parts():
    steps, consumer = runner([Early], [OnConnection])
    w, c = steps.worker, steps.consumer
    assert (w.hostname, w.pool, w.app.main, w.consumer) == ("w1@host", "the-pool", "steps", c)
    assert c.controller is w and c.timer is w.timer and c.pool == "the-pool"
    assert hasattr(w, "timer") and not hasattr(w, "semaphore")
    with pytest.raises(MissingPart, match="ccworker's worker has no 'semaphore'"):
        w.semaphore  # noqa: B018


def test_task_consumer_view_adds_and_cancels_queues():
    steps, consumer = runner(consumer_steps=[OnConnection])
    added = []
    consumer.broker = SimpleNamespace(connection="c", add_queue=added.append,
                                      cancel_queue=added.append)
    queue = SimpleNamespace(name="extra")
    view = steps.consumer.task_consumer
    view.add_queue(queue)
    view.add_queue(queue)
    assert view.consuming_from("extra") and view.queues == [queue] and added == [queue]
    view.cancel_by_queue("extra")
    assert not view.consuming_from(queue) and added == [queue, "extra"]


def test_request_sets_follow_celery_worker_state():
    state = SimpleNamespace(requests={}, reserved_requests=set(), active_requests=set())
    sets = RequestSets(state)
    running, waiting = Request.__new__(Request), Request.__new__(Request)
    running.message = SimpleNamespace(id="a")  # Request.id reads the message's
    waiting.message = SimpleNamespace(id="b")
    sets.received(running)
    sets.received(waiting)
    sets.started(running)
    assert state.active_requests == {running} and len(state.requests) == 2
    sets.lost()  # reserved messages went back with the connection
    assert state.reserved_requests == {running} and list(state.requests.values()) == [running]
    sets.finished(running, None, None)
    assert not (state.requests or state.reserved_requests or state.active_requests)
