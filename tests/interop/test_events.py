"""celeryev events, differential: what a monitor (Flower, ``celery events``) receives.

A real ``EventReceiver`` (the one Flower and ``celery events`` use) listens
while a worker starts with ``-E``, runs a set of tasks and stops. The events
of ``celery worker`` and of ``ccworker`` are compared after normalising what
differs between any two runs (hostnames, pids, clocks, times, ids,
tracebacks beyond their last line, load averages).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
import time
from typing import Iterator

import pytest

import harness
from celerycompat.celery_release import cancels_on_cold_shutdown

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

ENV = (("C_FORCE_ROOT", "1"),)
PROJECT = "proj_wire"


class Listener:
    """Collects the events of one worker (by hostname) in a background thread."""

    def __init__(self, app, hostname: str):
        self.app = app
        self.hostname = hostname
        self.events: list[dict] = []
        self._receiver = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _on_event(self, event: dict) -> None:
        if event.get("hostname") == self.hostname:
            self.events.append(dict(event))

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self._receiver = self.app.events.Receiver(connection,
                                                      handlers={"*": self._on_event})
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def start(self) -> Listener:
        self._thread.start()
        time.sleep(1.0)  # the receiver's queue/subscription must exist first
        return self

    def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.events):
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(5)


def normalise(events: list[dict], task_ids: list[str]) -> list:
    """Comparable form: per task (in send order) its events; worker events by type."""
    names = {tid: f"<task{i}>" for i, tid in enumerate(task_ids)}
    per_task: dict[str, list] = {tid: [] for tid in task_ids}
    worker: dict[str, dict] = {}
    clocks = [e["clock"] for e in events if e.get("clock") is not None]
    for event in events:
        kind = event["type"]
        if kind.startswith("worker-"):
            if kind not in worker:
                worker[kind] = {
                    key: (type(value).__name__ if key in (
                        "hostname", "pid", "clock", "timestamp", "loadavg", "active",
                        "processed", "utcoffset", "local_received") else value)
                    for key, value in event.items()
                }
            continue
        uuid = event.get("uuid")
        if uuid not in per_task:
            continue
        shown = {}
        for key, value in event.items():
            if key in ("hostname", "pid", "clock", "timestamp", "utcoffset", "runtime",
                       "local_received"):
                shown[key] = type(value).__name__
            elif key in ("uuid", "root_id", "parent_id") and value in names:
                shown[key] = names[value]
            elif key == "traceback" and isinstance(value, str):
                shown[key] = value.strip().splitlines()[-1]
            elif key in ("eta", "expires") and value:
                shown[key] = "<iso>"
            else:
                shown[key] = value
        per_task[uuid].append(shown)
    return [
        ["clock increases", clocks == sorted(clocks)],
        ["worker events", sorted(worker.items())],
        ["task events", [retried_before_requeued(per_task[tid]) for tid in task_ids]],
    ]


def retried_before_requeued(events: list) -> list:
    """A retry's ``task-retried`` first, then the ``task-received`` of the
    message the retry published. Celery's prefork parent sends the first when
    the child's result comes back and the second when the new message
    arrives; under load the message can come first (it carries an ETA, so it
    is received at once). Which comes first is that race, not behaviour."""
    events = list(events)
    for i in range(len(events) - 1):
        if events[i].get("type") == "task-received" and \
                events[i + 1].get("type") == "task-retried":
            events[i], events[i + 1] = events[i + 1], events[i]
    return events


class HeartbeatSpec(harness.WorkerSpec):
    """The harness's flags with heartbeats left on: worker events are under test."""

    def flags(self, nodename: str) -> list[str]:
        return [flag for flag in super().flags(nodename) if flag != "--without-heartbeat"]


#: Celery's ``exception`` field of task-retried (E11) and of task-failed for
#: ``Reject`` depends on its pool: under solo/threads it is the repr of an
#: internal wrapper (``"Retry(Retry(...), None, 0.2)"``,
#: ``"ExceptionWithTraceback()"``), under prefork (its default) the real
#: exception's repr. ccworker sends the prefork form on every pool
#: (docs/compat.md), so the celery side runs prefork here.
POOLS = {"celery": "prefork", "celery2": "prefork", "ccworker": "solo"}


@contextlib.contextmanager
def listened_worker(kind: str, spec: harness.WorkerSpec, broker: harness.BrokerEnv,
                    log_dir) -> Iterator[tuple]:
    """A started worker, a client app and a `Listener` of its events, listening
    since before the worker started; all stopped and cleaned up on exit."""
    worker = harness.WorkerProcess(kind, spec, broker, log_dir)
    with harness.client_app(PROJECT, worker.env) as app:
        listener = Listener(app, worker.nodename).start()
        try:
            worker.start()
            worker.wait_ready()
            yield worker, app, listener
        finally:
            worker.stop()
            listener.stop()
            broker.forget_queue(worker.token, worker.queue)


def run_events_scenario(kind: str, broker: harness.BrokerEnv, log_dir) -> list:
    spec = HeartbeatSpec(project=PROJECT, env=ENV, extra_flags=("-E",), pool=POOLS[kind])
    with listened_worker(kind, spec, broker, log_dir) as (worker, app, listener):
        assert listener.wait_for(lambda evs: any(e["type"] == "worker-online" for e in evs))
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1)
        # Sent first, to an idle worker: on RabbitMQ, Celery's client gives
        # an expired task a TTL of 0, and the broker drops it unless a
        # consumer can take it at once (behind other tasks, a prefetch
        # window that happened to be full dropped it, for either worker).
        expired = app.send_task("proj_wire.tasks.add", (1, 1), expires=past)
        sent = [
            app.send_task("proj_wire.tasks.add", (2, 3)),
            app.send_task("proj_wire.tasks.fail", ("boom",)),
            app.send_task("proj_wire.tasks.retry_until", (1,), {"countdown": 0.2}),
            app.send_task("proj_wire.tasks.rejecting"),
            app.send_task("proj_wire.tasks.rejecting_late"),
            app.send_task("proj_wire.tasks.ignoring"),
            app.send_task("proj_wire.tasks.late_ok", (7,)),
            app.send_task("proj_wire.tasks.nonexistent"),
            expired,
        ]
        ids = [r.id for r in sent]
        last = app.send_task("proj_wire.tasks.noop")
        last.get(timeout=30)
        # The retried task's second run waits out its countdown, so it can
        # still be running after ``last``: stopping the worker then (the
        # harness signals the whole process group) ends it with a
        # WorkerLostError on Celery's prefork pool (seen under 5.2.7).
        retried = sent[2]
        retried.get(timeout=30)
        assert listener.wait_for(
            lambda evs: {last.id, retried.id} <= {
                e.get("uuid") for e in evs if e["type"] == "task-succeeded"})
        assert listener.wait_for(
            lambda evs: any(e["type"] == "worker-heartbeat" for e in evs), timeout=10)
        assert worker.stop() == 0
        assert listener.wait_for(lambda evs: any(e["type"] == "worker-offline" for e in evs))
    return normalise(listener.events, ids)


def test_task_and_worker_events_match_celery(broker, interop_log_dir):
    kinds = harness.selected_kinds()
    observed = {kind: run_events_scenario(kind, broker, interop_log_dir) for kind in kinds}
    celery_side = observed[kinds[0]]
    assert celery_side[0] == ["clock increases", True]
    task_events = celery_side[2][1]
    assert [e["type"] for e in task_events[0]] == [
        "task-received", "task-started", "task-succeeded"]
    harness.assert_same_across_kinds(observed)


def run_cold_shutdown_scenario(kind: str, broker: harness.BrokerEnv, log_dir) -> list:
    """A prefork worker with ``-E`` gets SIGQUIT while a task naps: the
    events a monitor receives for that task."""
    spec = harness.WorkerSpec(project=PROJECT, env=ENV, extra_flags=("-E",), pool="prefork")
    with listened_worker(kind, spec, broker, log_dir) as (worker, app, listener):
        napping = app.send_task("proj_wire.tasks.nap", (30,)).id
        assert listener.wait_for(lambda evs: any(
            e["type"] == "task-started" and e.get("uuid") == napping for e in evs)), \
            worker.log_tail(40)
        os.kill(worker.pid, signal.SIGQUIT)
        worker.proc.wait(25)
        # Celery sends its task-cancelled after worker-offline (it leaves
        # the event buffer last); before 5.5 its last event is task-failed.
        listener.wait_for(lambda evs: any(
            e["type"] == "task-cancelled" and e.get("uuid") == napping for e in evs),
            timeout=3)
    return [event["type"] for event in listener.events if event.get("uuid") == napping]


def test_cold_shutdown_cancels_the_running_task_as_celery(broker, interop_log_dir):
    """B37: from Celery 5.5 a cold shutdown cancels each running task with a
    ``task-cancelled`` event (Flower then shows it CANCELLED). ccworker used
    to send none (the task stayed started for a monitor). What follows the
    event differs on purpose (Celery stores RETRY, which nothing runs
    again; ccworker returns the message to the queue: docs/compat.md).

    Before 5.5 Celery's prefork pool reports the killed run as a lost worker
    (``task-failed``, WorkerLostError stored) and the task never runs again;
    ccworker returns its message instead, so it sends nothing after
    ``task-started`` there (the documented difference)."""
    kinds = harness.selected_kinds()
    observed = {kind: run_cold_shutdown_scenario(kind, broker, interop_log_dir)
                for kind in kinds}
    started = ["task-received", "task-started"]
    if cancels_on_cold_shutdown():
        assert observed[kinds[0]] == [*started, "task-cancelled"], observed
        harness.assert_same_across_kinds(observed)
        return
    for kind, events in observed.items():
        if kind.startswith("celery"):
            assert events[:2] == started, observed
        else:
            assert events == started, observed
