"""``revoke_by_stamped_headers``, differential: revoking canvases by stamp.

A real client stamps its signatures (``sig.stamp(visitor=...)``, project
``proj_stamps``) and an operator revokes by stamp with the real ``celery
control revoke_by_stamped_headers`` CLI and with ``app.control``. Against
``celery worker`` and ``ccworker`` (with ``-E``, on Redis and RabbitMQ) the
test compares the replies, which tasks run, the stored results, the
``task_received``/``task_revoked`` signals, the task events a monitor sees
and the "Discarding revoked task" log lines.

Terminating a *running* task by stamp (``terminate=True``) ends it on both
(prefork: the child is signalled; test_terminate.py covers terminating in
depth).
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time

import celery
import pytest
from test_events import Listener

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

PROJECT = "proj_stamps"
WORKER_DEFAULTS = {"project": PROJECT, "extra_flags": ("-E",)}


def cli(worker: harness.WorkerProcess, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", PROJECT, *args, "-d", worker.nodename],
        cwd=str(harness.PROJECTS_DIR), env=worker.process_env(), capture_output=True,
        text=True, timeout=60)
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def per_task(entries: list, ids: list[str]) -> list:
    """Entries (``[kind, {"id": ...}]``) grouped by task, in the order ``ids`` were sent."""
    grouped: dict[str, list] = {task_id: [] for task_id in ids}
    for kind, detail in entries:
        if detail.get("id") in grouped:
            grouped[detail["id"]].append([kind, {k: v for k, v in detail.items() if k != "id"}])
    return [grouped[task_id] for task_id in ids]


def records(observe) -> list:
    raw = observe.results.lrange(observe.worker.record_key, 0, -1)
    return [json.loads(entry) for entry in raw]


def event_entries(listener: Listener) -> list:
    shown = ("terminated", "signum", "expired", "result", "name")
    return [[event["type"], {"id": event.get("uuid"),
                             **{k: event[k] for k in shown if k in event}}]
            for event in listener.events if event["type"].startswith("task-")]


def discard_lines(observe, ids: list[str]) -> list[str]:
    """The "Discarding revoked task" lines, in the order the tasks were sent."""
    text = observe.worker.log()[observe._log_offset:]
    lines = [line.split("] ", 1)[1] for line in text.splitlines()
             if "Discarding revoked task" in line and "] " in line]
    return sorted(lines, key=lambda line: next(
        (i for i, task_id in enumerate(ids) if f"[{task_id}]" in line), len(ids)))


def test_revoke_by_stamped_headers_matches_celery(broker, run_differential):
    def scenario(app, observe):
        tasks = importlib.import_module(f"{PROJECT}.tasks")
        stamped = tasks.stamped
        node = observe.worker.nodename
        listener = Listener(app, node).start()
        try:
            bad, listed, unused = observe.new_id(), observe.new_id(), observe.new_id()
            observe.record("cli", cli(observe.worker, "control", "revoke_by_stamped_headers",
                                      f"mystamp={bad}"))
            observe.record("app.control", app.control.revoke_by_stamped_headers(
                {"mystamp": [listed]}, destination=[node], reply=True, timeout=3.0))
            observe.record("broadcast, no =", app.control.broadcast(
                "revoke_by_stamped_headers", arguments={"headers": ["mystamp"]},
                destination=[node], reply=True, timeout=3.0))
            observe.record("terminate, nothing running", app.control.broadcast(
                "revoke_by_stamped_headers",
                arguments={"headers": {"mystamp": unused}, "terminate": True},
                destination=[node], reply=True, timeout=3.0))

            sent = {
                "revoked": stamped(tasks.add.s(1, 1), mystamp=bad).apply_async(),
                "other value": stamped(tasks.add.s(2, 2), mystamp="fine").apply_async(),
                "one of a list": stamped(tasks.add.s(3, 3),
                                         mystamp=["other", listed]).apply_async(),
                "unstamped": tasks.add.s(4, 4).apply_async(),
                "other name": stamped(tasks.add.s(5, 5), other=bad).apply_async(),
                "eta": stamped(tasks.add.s(6, 6), mystamp=bad).apply_async(countdown=1),
                "expiring": stamped(tasks.add.s(7, 7), mystamp=bad).apply_async(expires=600),
                "seen stamps": stamped(tasks.seen_stamps.s(), mystamp="fine",
                                       multi=["a", "b"]).apply_async(),
            }
            group_result = stamped(celery.group(tasks.add.s(8, 8), tasks.add.s(9, 9)),
                                   mystamp=bad).apply_async()
            members = {f"group member {i}": r for i, r in enumerate(group_result.results)}
            for result in [*sent.values(), *members.values()]:
                observe.register_id(result.id)
            for label, result in [*sent.items(), *members.items()]:
                observe.get_and_meta(result, label)
            observe.settle()
            ids = [result.id for result in [*sent.values(), *members.values()]]
            revoked_ids = observe.app.control.inspect(destination=[node], timeout=3.0).revoked()
            observe.record("inspect revoked (this scenario's ids)",
                           [i for i in (revoked_ids or {}).get(node, []) if i in ids])

            def done(entries):
                finished = {d.get("id") for kind, d in entries if kind in ("ran", "task_revoked")}
                return set(ids) <= finished

            deadline = time.monotonic() + 10
            while not done(records(observe)) and time.monotonic() < deadline:
                time.sleep(0.05)
            observe.record("signals and runs", per_task(records(observe), ids))
            listener.wait_for(lambda events: sum(
                1 for e in events if e["type"] in ("task-succeeded", "task-revoked")
                and e.get("uuid") in ids) >= len(ids), timeout=10)
            observe.record("events", per_task(event_entries(listener), ids))
            observe.record("discard log lines", discard_lines(observe, ids))
        finally:
            listener.stop()

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["revoked"]["state"] == "REVOKED"
    assert celery_obs["one of a list"]["state"] == "REVOKED"
    assert celery_obs["eta"]["state"] == "REVOKED"
    assert celery_obs["other value"]["state"] == "SUCCESS"
    assert celery_obs["seen stamps"]["value"]["stamps"] == {"mystamp": "fine",
                                                             "multi": ["a", "b"]}
    assert celery_obs == cc_obs


def terminate_scenario(kind: str, log_dir) -> dict:
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    spec = harness.WorkerSpec(project=PROJECT, pool="prefork", concurrency=2)
    worker = harness.WorkerProcess(kind, spec, broker, log_dir).start()
    out: dict = {}
    try:
        worker.wait_ready()
        with harness.client_app(PROJECT, worker.env) as app:
            tasks = importlib.import_module(f"{PROJECT}.tasks")
            node = worker.nodename
            stamp = f"t-{worker.token}"
            running = tasks.stamped(tasks.slow.s(3), mystamp=stamp).apply_async()
            deadline = time.monotonic() + 15
            inspect = app.control.inspect(destination=[node], timeout=2.0)
            while time.monotonic() < deadline and not (inspect.active() or {}).get(node):
                time.sleep(0.1)
            # Celery's own client method, which reads reply["ok"] of every reply.
            replies = app.control.revoke_by_stamped_headers(
                {"mystamp": stamp}, destination=[node], terminate=True, signal="SIGKILL",
                reply=True, timeout=3.0)
            out["reply"] = [re.sub(r"[0-9a-f-]{36}", "<id>", reply[node]["ok"])
                            .replace(stamp, "<stamp>") for reply in replies]
            try:
                running.get(timeout=30, propagate=False)
            finally:
                out["state"] = running.state
    finally:
        worker.stop()
        broker.forget_queue(worker.token, worker.queue)
    return out


def test_terminate_of_a_running_task_by_stamp(redis_available, interop_log_dir):
    """Both workers end the matching task (prefork: the child is signalled) and
    answer with Celery's reply, which Celery's client method reads."""
    seen = {kind: terminate_scenario(kind, interop_log_dir)
            for kind in harness.selected_kinds()}
    for kind, observed in seen.items():
        assert observed == {
            "reply": ["headers defaultdict(<class 'set'>, {'mystamp': {'<stamp>'}}) revoked"],
            "state": "REVOKED"}, (kind, observed)
