"""A task's own ``Request`` class (consumer/project_requests.py).

The calls Celery's base hooks make to each other, the class ccworker
composes, and the observer over the in-memory broker with a real threads
pool: which hook runs for which outcome, with what. What ``celery worker``
does with the same class is the interop suite's reference
(tests/interop/test_project_requests.py).
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
import uuid

import pytest
from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from billiard.exceptions import Terminated
from celery import Celery
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from celery.worker.request import Request
from memory_broker import MemoryBroker
from test_consumer import wait_for

from celerycompat.backends import result_store_for
from celerycompat.consumer.consumer import Consumer
from celerycompat.consumer.decoder import make_decoder
from celerycompat.consumer.project_requests import (
    CeleryCallGraph,
    _einfo,
    composed_class,
    project_requests,
)
from celerycompat.execution.context import own_request_class
from celerycompat.execution.runner import RunSettings, TaskRunner
from celerycompat.pools import child
from celerycompat.pools.base import soft_limit_exceeded
from celerycompat.pools.threads import ThreadPool

CALLS: list[tuple] = []


class Recording(Request):
    """Records each hook, then calls Celery's (as projects do)."""

    def on_accepted(self, pid, time_accepted):
        CALLS.append(("on_accepted", self.task.name, pid))
        super().on_accepted(pid, time_accepted)

    def on_success(self, failed__retval__runtime, **kwargs):
        CALLS.append(("on_success", self.task.name))
        return super().on_success(failed__retval__runtime, **kwargs)

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        exc = exc_info.exception
        exc = exc.exc if isinstance(exc, ExceptionWithTraceback) else exc
        CALLS.append(("on_failure", self.task.name, type(exc).__name__, return_ok))
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_retry(self, exc_info):
        CALLS.append(("on_retry", self.task.name))
        super().on_retry(exc_info)

    def on_timeout(self, soft, timeout):
        CALLS.append(("on_timeout", self.task.name, soft, timeout))
        super().on_timeout(soft, timeout)

    def acknowledge(self):
        CALLS.append(("acknowledge", self.task.name))
        super().acknowledge()

    def reject(self, requeue=False):
        CALLS.append(("reject", self.task.name, requeue))
        super().reject(requeue=requeue)


class Exploding(Request):
    def on_accepted(self, pid, time_accepted):
        raise RuntimeError("a project bug")


@pytest.fixture(autouse=True)
def _calls():
    CALLS.clear()
    yield
    CALLS.clear()


@pytest.fixture
def app():
    app = Celery(f"t{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://",
                 set_as_current=False)

    @app.task(name="t.ok", shared=False, Request=Recording)
    def ok(n):
        return n

    @app.task(name="t.boom", shared=False, Request=Recording, acks_late=True)
    def boom():
        raise KeyError("boom")

    @app.task(name="t.retry", shared=False, Request=Recording, bind=True, max_retries=1)
    def retry(self):
        raise self.retry(exc=ValueError("again"), countdown=60)

    @app.task(name="t.soft", shared=False, Request=Recording, soft_time_limit=0.2)
    def soft():
        try:
            for _ in range(100):  # bytecode between short waits: the limit lands at once
                time.sleep(0.05)
        except SoftTimeLimitExceeded:
            return "soft"

    @app.task(name="t.explodes", shared=False, Request=Exploding)
    def explodes():
        return "still run"

    @app.task(name="t.plain", shared=False)
    def plain():
        return "plain"

    app.finalize()
    return app


@pytest.fixture
def consumer_for(app):
    """A consumer with the project's requests observed, on a memory broker."""
    started = []

    def start():
        broker = MemoryBroker()
        runner = TaskRunner(app, RunSettings(hostname="t@h"), result_store_for)
        pool = ThreadPool(runner, 2)
        pool.start()
        consumer = Consumer(app=app, broker_factory=lambda: broker, pool=pool,
                            store=result_store_for(app), queues=["celery"],
                            decode=make_decoder(app.conf.accept_content), hostname="t@h",
                            prefetch_multiplier=1)
        requests = project_requests(app, pool, "threads")
        consumer.observe(requests)
        thread = threading.Thread(target=consumer.run, daemon=True)
        thread.start()
        started.append((consumer, pool, thread, requests))
        return broker

    yield start
    for consumer, pool, thread, requests in started:
        consumer.should_stop = True
        thread.join(5)
        pool.stop()
        requests.close()


def _request(app, name, cls, **headers):
    task = app.tasks[name]
    message = type("M", (), {"delivery_info": {}, "properties": {}, "headers": {},
                             "body": b""})()
    return cls(message, app=app, task=task, hostname="t@h", decoded=True,
               body=((), {}, {}), headers={"id": "x", "task": name, **headers})


# -- the composed class ---------------------------------------------------------------


def test_own_request_class_is_none_for_celerys_own(app):
    assert own_request_class(app.tasks["t.plain"]) is None
    assert own_request_class(app.tasks["t.ok"]) is Recording


def test_the_projects_super_reaches_the_call_graph_then_celerys_request():
    cls = composed_class(Recording)
    assert cls.__mro__[1:4] == (Recording, CeleryCallGraph, Request)
    assert composed_class(Recording) is cls


def test_a_success_never_reaches_the_classs_own_on_success(app):
    """Celery's ``create_request_cls`` replaces it; with acks_late it acks."""
    request = _request(app, "t.boom", composed_class(Recording))
    request.on_success((False, "'x'", 0.1))
    assert CALLS == [("acknowledge", "t.boom")]


@pytest.mark.parametrize(("exc", "calls"), [
    (Retry(exc=ValueError("v")), [("on_failure", "t.ok", "Retry", True), ("on_retry", "t.ok")]),
    (Reject("no", requeue=True), [("on_failure", "t.ok", "Reject", True),
                                  ("reject", "t.ok", True)]),
    (Ignore(), [("on_failure", "t.ok", "Ignore", True), ("acknowledge", "t.ok")]),
    (KeyError("k"), [("on_failure", "t.ok", "KeyError", True)]),
    (Terminated(15), [("on_failure", "t.ok", "Terminated", True)]),
])
def test_a_failure_goes_on_where_celerys_on_failure_goes(app, exc, calls):
    request = _request(app, "t.ok", composed_class(Recording))
    request.on_success((True, _einfo(exc), 0.1))
    assert CALLS == calls


def test_late_ack_failure_and_timeout_settle_as_celerys_hooks_do(app):
    request = _request(app, "t.boom", composed_class(Recording))
    request.on_failure(_einfo(KeyError("k")), return_ok=True)
    request.on_timeout(False, 5)
    # Celery 5.7's own flag, or the one older releases have.
    flag = "acks_on_timeout" if hasattr(request.task, "acks_on_timeout") \
        else "acks_on_failure_or_timeout"
    setattr(request.task, flag, False)
    try:
        request.on_timeout(False, 5)
    finally:
        delattr(request.task, flag)
    assert CALLS == [("on_failure", "t.boom", "KeyError", True), ("acknowledge", "t.boom"),
                     ("on_timeout", "t.boom", False, 5), ("acknowledge", "t.boom"),
                     ("on_timeout", "t.boom", False, 5), ("reject", "t.boom", True)]


def test_exception_info_of_an_exception_without_traceback():
    """Regression: one that crossed from a child has none, and billiard's
    ``ExceptionInfo`` needs one (the consumer thread died of it)."""
    made_here = _einfo(KeyError("k"), "Traceback (text)")
    assert isinstance(made_here.exception, ExceptionWithTraceback)
    assert made_here.exception.exc.args == ("k",)
    assert made_here.traceback == "Traceback (text)"
    from_child = _einfo(KeyError("k"), from_child=True)
    assert isinstance(from_child.exception, KeyError)
    assert isinstance(from_child, ExceptionInfo)


# -- the observer ---------------------------------------------------------------------


def test_hooks_run_for_each_outcome(app, consumer_for):
    broker = consumer_for()
    for name in ("t.ok", "t.boom", "t.retry"):
        task_id = broker.publish(app, name, (1,) if name == "t.ok" else ())
        assert wait_for(lambda task_id=task_id: broker.settled(task_id))
    assert wait_for(lambda: len(CALLS) >= 9)
    pid = CALLS[0][2]
    assert CALLS == [
        ("on_accepted", "t.ok", pid), ("acknowledge", "t.ok"),
        ("on_accepted", "t.boom", pid), ("on_failure", "t.boom", "KeyError", True),
        ("acknowledge", "t.boom"),
        ("on_accepted", "t.retry", pid), ("acknowledge", "t.retry"),
        ("on_failure", "t.retry", "Retry", True), ("on_retry", "t.retry"),
    ]


def test_the_soft_limit_reaches_on_timeout(app, consumer_for):
    broker = consumer_for()
    task_id = broker.publish(app, "t.soft")
    assert app.AsyncResult(task_id).get(timeout=5) == "soft"
    assert CALLS[-1] == ("on_timeout", "t.soft", True, 0.2)


def test_a_hook_that_raises_is_logged_and_the_task_still_runs(app, consumer_for, caplog):
    broker = consumer_for()
    with caplog.at_level(logging.ERROR, logger="multiprocessing"):
        task_id = broker.publish(app, "t.explodes")
        assert wait_for(lambda: broker.settled(task_id) == ["ack"])
    assert app.AsyncResult(task_id).get(timeout=5) == "still run"
    assert "Pool callback raised exception: RuntimeError('a project bug')" in caplog.text
    # The consumer goes on.
    after = broker.publish(app, "t.plain")
    assert wait_for(lambda: broker.settled(after) == ["ack"])


def test_no_observer_without_an_own_request_class(app):
    """(An app of its own: a real one also holds every shared task imported so far.)"""
    only_plain = type("App", (), {"tasks": {"t.plain": app.tasks["t.plain"],
                                            "celery.chord": app.tasks["t.ok"]}})()
    assert project_requests(only_plain, None, "threads") is None


def test_soft_limit_listeners_hear_the_message(caplog):
    heard = []
    from celerycompat.pools import base

    base.soft_limit_listeners.append(lambda message, soft: heard.append((message.id, soft)))
    try:
        message = type("M", (), {"id": "abc", "name": "t.x"})()
        with caplog.at_level(logging.WARNING, logger="celery.worker.request"):
            soft_limit_exceeded(1.5, message)
    finally:
        base.soft_limit_listeners.pop()
    assert heard == [("abc", 1.5)]
    assert "Soft time limit (1.5s) exceeded for t.x[abc]" in caplog.text


# -- what a prefork child sends back --------------------------------------------------


class NeedsTwo(Exception):
    def __init__(self, a, b):
        super().__init__(a)


def test_a_child_sends_the_exception_only_for_an_own_request_class(app):
    runner = type("R", (), {"app": app})()
    child._keeps_exception.clear()
    kept = child._crossing_retval(runner, "t.ok", KeyError("k"))
    assert isinstance(kept, KeyError) and pickle.loads(pickle.dumps(kept)).args == ("k",)
    assert child._crossing_retval(runner, "t.plain", KeyError("k")) is None
    assert child._crossing_retval(runner, "t.ok", "a return value") is None
    # One that would not unpickle in the parent is not sent.
    assert child._crossing_retval(runner, "t.ok", NeedsTwo(1, 2)) is None
