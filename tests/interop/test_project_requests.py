"""A task's own ``Request`` class (``Task.Request``), beside ``celery worker``.

``proj_requests`` gives every task a `TrackedRequest` (the Celery docs'
example, which logs from ``on_timeout`` and ``on_failure``) that records each
hook the worker calls, with what it was given, and each
``acknowledge``/``reject`` Celery's base hooks make. The same tasks go to both
workers one after the other: a success, failures (early and late ack), a
retry, a ``Reject``, and on prefork a hard and a soft time limit and a
``revoke(terminate=True)``. Compared: the hooks called for each task, in
order, with their arguments; the results; the project's log lines. A success
never reaches the class's own ``on_success`` (Celery's ``create_request_cls``
replaces it, and its replacement goes on to ``on_failure`` for a failure).
"""

from __future__ import annotations

import time

import pytest

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

PROJECT = "proj_requests"

#: (task, args); the time limits only where Celery's pool enforces them.
TASKS = [("ok", (1,)), ("boom", ()), ("late_boom", ()), ("retry_once", ()),
         ("rejected", ())]
LIMITED = [("hard_limit", ()), ("soft_limit", ())]

LOG_LINES = ("A hard timeout was enforced for task proj_requests.tasks.hard_limit",
             "Failure detected for task proj_requests.tasks.boom",
             "Soft time limit (0.5s) exceeded for proj_requests.tasks.soft_limit")


def hooks(worker: harness.WorkerProcess) -> list:
    return [(event, detail) for event, detail in worker.recorded()
            if event.startswith("request.")]


def hooks_by_task(calls: list) -> dict:
    """Each run's hook calls in order, by task and run (a retried task's
    runs share its id; ``run`` is the message's retries count). Across
    runs the order is not fixed: the client sends the next task once the
    result is stored, which a pool process does before the worker hears
    the run is over, so the next task can be accepted before the last
    one's hooks run (Celery's too); and a retry's new message, due 0.1 s
    after the first run published it, can start on the other child before
    the first run's failure hooks (seen once under CI load)."""
    by_task: dict = {}
    for event, detail in calls:
        by_task.setdefault(f"{detail['task']} run {detail['run']}", []).append((event, detail))
    return by_task


def terminate_one(app, worker: harness.WorkerProcess) -> str:
    """``revoke(terminate=True)`` a running ``sleeper``; its final state."""
    result = app.send_task(f"{PROJECT}.tasks.sleeper", args=(30,), queue=worker.queue)
    harness.wait_until(lambda: any(
        event == "request.on_accepted" and detail["task"].endswith("sleeper")
        for event, detail in hooks(worker)), 20)
    time.sleep(0.3)  # the child is in the task body
    app.control.revoke(result.id, terminate=True)
    harness.wait_until(lambda: any(
        event == "request.on_failure" and detail["task"].endswith("sleeper")
        for event, detail in hooks(worker)), 20)
    return result.state


def observe(kind: str, pool: str, broker: harness.BrokerEnv, log_dir, limits: bool) -> dict:
    spec = harness.WorkerSpec(project=PROJECT, pool=pool, concurrency=2)
    worker = harness.WorkerProcess(kind, spec, broker, log_dir).start()
    seen: dict = {"results": []}
    try:
        worker.wait_ready()
        with harness.client_app(PROJECT, worker.env) as app:
            for name, args in TASKS + (LIMITED if limits else []) + [("ok", (2,))]:
                result = app.send_task(f"{PROJECT}.tasks.{name}", args=args,
                                       queue=worker.queue)
                if name == "rejected":
                    # Before 5.7 a rejected task stores nothing: wait for its hook.
                    harness.wait_until(lambda: any(
                        event == "request.reject" for event, _ in hooks(worker)), 20)
                    seen["results"].append((name, result.state))
                    continue
                value = result.get(timeout=60, propagate=False)
                seen["results"].append((name, result.state, type(value).__name__))
            if limits:
                seen["terminated"] = terminate_one(app, worker)
        # The last task's hooks run once its result is stored: wait for them.
        harness.wait_until(lambda: sum(
            event == "request.on_accepted" and detail["args"] == [2]
            for event, detail in hooks(worker)) == 1, 20)
        time.sleep(0.5)
        seen["hooks"] = hooks_by_task(hooks(worker))
    finally:
        seen["exit status"] = worker.stop()
    log = worker.log()
    seen["log lines"] = {line: line in log for line in LOG_LINES}
    return seen


@pytest.mark.parametrize(("pool", "broker"), [("prefork", "redis"), ("threads", "amqp")],
                         indirect=["broker"])
def test_request_hooks_run_as_in_celery(pool, broker, interop_log_dir):
    limits = pool == "prefork"  # Celery's threads pool has no time limits
    observed = {kind: observe(kind, pool, broker, interop_log_dir, limits)
                for kind in harness.selected_kinds()}
    reference = observed.get("celery", next(iter(observed.values())))
    called = [event for calls in reference["hooks"].values() for event, _ in calls]
    assert "request.on_accepted" in called and "request.on_retry" in called, called
    assert "request.on_success" not in called, called
    if limits:
        assert all(reference["log lines"].values()), reference["log lines"]
    for kind, seen in observed.items():
        for key in seen:
            assert seen[key] == reference[key], (kind, key)
