"""Terminating a running task, differential: ``revoke(terminate=True)`` and friends.

A task is running (its body recorded ``started``) when an operator ends it
with ``app.control.revoke(id, terminate=True, signal=...)`` or the real
``celery control terminate SIGNAL ID`` CLI. Against ``celery worker`` and
``ccworker`` (``-E``, Redis and RabbitMQ) the tests compare what a client
sees: the reply, the stored meta (REVOKED ``terminated``), the
``task-revoked`` event (``terminated``, ``signum``) and no other outcome
event, the ``task_revoked`` signal, whether the task's ``finally`` ran, the
message (acked: not in Redis' ``unacked`` any more), the log lines, and that
the worker then runs tasks on all its slots again.

* prefork: SIGTERM (the child unwinds: ``finally`` runs) and SIGKILL (it
  does not); the child is replaced.
* gevent: the greenlet is killed. Celery's gevent pool then also sends a
  ``task-succeeded`` event (result ``None``) for the terminated task, which
  ccworker does not (docs/compat.md); everything else is compared.
* threads: Celery's threads pool cannot terminate (an error reply; the
  task runs on to SUCCESS). ccworker's can: it is compared with
  ``celery worker -P prefork``, on a task that runs Python code (a task
  blocked in a C call is unwound only when the call returns; its slot and
  the outcome do not wait).
* solo: a control message is read only between tasks, on both workers, so
  a running task is never terminated: no reply in time, then SUCCESS.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid

import pytest
from test_events import Listener

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

PROJECT = "proj_pool"
WORKER_DEFAULTS = {"project": PROJECT, "concurrency": 2, "extra_flags": ("-E",)}


def cli(worker: harness.WorkerProcess, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", PROJECT, *args, "-d", worker.nodename],
        cwd=str(harness.PROJECTS_DIR), env=worker.process_env(), capture_output=True,
        text=True, timeout=60)
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def records(observe) -> list:
    return [json.loads(raw) for raw in observe.results.lrange(observe.worker.record_key, 0, -1)]


wait_until = harness.wait_until


def wait_started(observe, task_id: str) -> bool:
    return bool(wait_until(lambda: any(
        kind == "started" and detail.get("id") == task_id for kind, detail in records(observe))))


def task_records(observe, task_id: str) -> list:
    """What the task and the signals recorded for ``task_id``, in a canonical order
    (the child's ``finally`` and the parent's ``task_revoked`` race on prefork)."""
    return sorted(([kind, {k: v for k, v in detail.items() if k != "id"}]
                   for kind, detail in records(observe) if detail.get("id") == task_id),
                  key=lambda entry: json.dumps(entry, sort_keys=True))


def task_events(listener: Listener, task_id: str) -> list:
    shown = ("terminated", "signum", "expired", "result", "exception")
    return [[event["type"], {k: event[k] for k in shown if k in event}]
            for event in listener.events if event.get("uuid") == task_id]


def ask(observe, method: str, **arguments) -> list:
    node = observe.worker.nodename
    replies = observe.app.control.broadcast(method, arguments=arguments, destination=[node],
                                            reply=True, timeout=3.0)
    return [reply[node] for reply in replies if node in reply]


def ask_node(app, node: str, method: str, **arguments) -> list:
    replies = app.control.broadcast(method, arguments=arguments, destination=[node],
                                    reply=True, timeout=3.0)
    return [reply[node] for reply in replies if node in reply and reply[node]]


def in_unacked(observe, task_id: str):
    """Redis: is the task's message still held un-acked (kombu's ``unacked`` hash)?
    None on RabbitMQ (its un-acked count is not readable from a client)."""
    if observe.broker.name != "redis":
        return None
    import redis

    client = redis.Redis.from_url(observe.broker.url)
    try:
        return any(task_id.encode() in value for value in client.hvals("unacked"))
    finally:
        client.close()


def all_slots_serve(observe, label: str, slots: int = 2) -> None:
    """``slots`` tasks run at the same time: every slot serves again."""
    key = f"ccit.barrier.{uuid.uuid4().hex}"
    results = [observe.send("barrier", (key, slots)) for _ in range(slots)]
    observe.record(label, [r.get(timeout=40, propagate=False) for r in results])


def normalise_problem(line: str) -> str:
    return re.sub(r"pid:\d+", "pid:<pid>", line)


def terminate_scenario(task: str = "sleep", signal: str = "SIGTERM", via_cli: bool = False,
                       seconds: int = 30):
    """Start ``task``, terminate it while it runs, observe what a client sees."""

    def scenario(app, observe):
        listener = Listener(app, observe.worker.nodename).start()
        try:
            result = observe.send(task, (seconds,))
            observe.record("started", wait_started(observe, result.id))
            if via_cli:
                observe.record("reply", cli(observe.worker, "control", "terminate", signal,
                                            result.id))
            else:
                observe.record("reply", app.control.revoke(
                    result.id, terminate=True, signal=signal, reply=True, timeout=3.0,
                    destination=[observe.worker.nodename]))
            observe.poll_meta(result.id, "meta", until=("REVOKED", "SUCCESS", "FAILURE"))
            observe.record("state", result.state)
            observe.record("active after", ask(observe, "active"))
            listener.wait_for(lambda events: any(
                e["type"] == "task-revoked" and e.get("uuid") == result.id for e in events))
            all_slots_serve(observe, "all slots serve after")
            observe.record("log: Terminating", f"Terminating {result.id}" in observe.worker.log())
            observe.record("unacked", in_unacked(observe, result.id))
            observe.record("records", task_records(observe, result.id))
            observe.settle()
            observe.record("events", task_events(listener, result.id))
            observe.log_problems("log problems", normalise_problem)
        finally:
            listener.stop()

    return scenario


@pytest.mark.parametrize("task, signal, via_cli", [
    ("sleep", "SIGTERM", False),
    ("sleep_late", "SIGKILL", True),
], ids=["SIGTERM-app.control", "SIGKILL-acks_late-cli"])
def test_terminate_on_prefork_matches_celery(broker, run_differential, task, signal, via_cli):
    celery_obs, cc_obs = run_differential(terminate_scenario(task, signal, via_cli), broker,
                                          pool="prefork")
    assert celery_obs["state"] == "REVOKED"
    assert celery_obs["all slots serve after"] == [True, True]
    assert celery_obs["log problems"] == []
    events = [event[0] for event in celery_obs["events"]]
    assert events == ["task-received", "task-started", "task-revoked"], events
    assert celery_obs == cc_obs


def test_terminate_on_gevent_matches_celery(broker, run_differential):
    """Everything as Celery's gevent pool, but its extra ``task-succeeded`` event."""
    celery_obs, cc_obs = run_differential(terminate_scenario(), broker, pool="gevent")
    assert celery_obs["state"] == "REVOKED"
    celery_events = celery_obs["events"]
    assert [event[0] for event in celery_events] == [
        "task-received", "task-started", "task-revoked", "task-succeeded"], celery_events
    assert cc_obs["events"] == celery_events[:-1]
    for obs in (celery_obs, cc_obs):
        obs.items = [(label, text) for label, text in obs.items if label != "events"]
    assert celery_obs == cc_obs


def test_terminate_on_threads_as_celery_prefork(broker, run_differential):
    """Celery's threads pool refuses; ccworker's terminates as Celery's prefork pool does."""
    celery_obs, cc_obs = run_differential(terminate_scenario(task="busy"), broker,
                                          pool="threads", by_kind={"celery": {"pool": "prefork"}})
    assert celery_obs["state"] == "REVOKED"
    assert ["finally", {}] in celery_obs["records"]
    assert celery_obs == cc_obs


def test_terminate_on_threads_of_a_task_blocked_in_a_call(broker, run_differential):
    """A task in ``time.sleep`` is unwound when the call returns; REVOKED, the event
    and the free slot do not wait for that (the ``finally`` record comes later)."""
    def without_finally(scenario):
        def run(app, observe):
            scenario(app, observe)
            for i, (label, value) in enumerate(observe.observations):
                if label == "records":
                    observe.observations[i] = (label, [e for e in value if e[0] != "finally"])
        return run

    celery_obs, cc_obs = run_differential(without_finally(terminate_scenario(seconds=8)),
                                          broker, pool="threads",
                                          by_kind={"celery": {"pool": "prefork"}})
    assert celery_obs["state"] == "REVOKED"
    assert celery_obs == cc_obs


def test_threads_terminate_celery_refuses(redis_available, interop_log_dir):
    """The reference for the difference above: Celery's threads pool answers
    NotImplementedError and the task runs on to SUCCESS."""
    if "celery" not in harness.selected_kinds():
        pytest.skip("only celery's side is observed here")
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    spec = harness.WorkerSpec(project=PROJECT, pool="threads", concurrency=2)
    worker = harness.WorkerProcess("celery", spec, broker, interop_log_dir).start()
    try:
        worker.wait_ready()
        with harness.client_app(PROJECT, worker.env) as app:
            slow = app.send_task(f"{PROJECT}.tasks.busy", (2,))
            wait_until(lambda: ask_node(app, worker.nodename, "active"))
            replies = app.control.revoke(slow.id, terminate=True, reply=True, timeout=3.0,
                                         destination=[worker.nodename])
            assert [r[worker.nodename] for r in replies] == [{
                "error": "NotImplementedError(\"<class 'celery.concurrency.thread.TaskPool'> "
                         "does not implement kill_job\")"}]
            assert slow.get(timeout=20) == 2
    finally:
        worker.stop()
        broker.forget_queue(worker.token, worker.queue)


def test_terminate_on_solo_cannot_reach_a_running_task(broker, run_differential):
    """Solo reads control messages between tasks only: no reply in time, the task
    succeeds, and the id is revoked afterwards (both workers)."""
    def scenario(app, observe):
        result = observe.send("sleep", (3,))
        observe.record("started", wait_started(observe, result.id))
        observe.record("reply", app.control.revoke(
            result.id, terminate=True, reply=True, timeout=1.0,
            destination=[observe.worker.nodename]))
        observe.get_and_meta(result, "result")
        # A loaded CI machine once kept Celery's solo worker from answering
        # within one inspect timeout: ask until it does.
        revoked = wait_until(lambda: ask(observe, "revoked"), timeout=15.0)
        observe.record("revoked", result.id in revoked[0])
        observe.record("records", task_records(observe, result.id))

    celery_obs, cc_obs = run_differential(scenario, broker, pool="solo", concurrency=1)
    assert celery_obs["reply"] == []
    assert celery_obs["result"]["state"] == "SUCCESS"
    assert celery_obs == cc_obs
