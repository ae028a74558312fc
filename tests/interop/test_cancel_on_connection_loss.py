"""``worker_cancel_long_running_tasks_on_connection_loss`` (Celery >= 5.1).

A late-acked task running when the broker connection is lost can no longer
be acked: RabbitMQ redelivers its message, so it will run again. With the
setting on, Celery cancels the running copy instead of letting it finish a
second time: WARNING "Task ... cannot be acknowledged after a connection
loss since late acknowledgement is enabled for it. Terminating it instead.",
the child terminated, RETRY stored (``cancelled by Celery``), then the
redelivered copy runs to SUCCESS.

A RabbitMQ node of the test's own (test_faults.py) is killed while a 4 s
``acks_late`` task runs on ``-P prefork -c 1`` and started again; compared
with ``celery worker``: how many runs started, which finished, the final
state, the states stored on the way, the log line. With the setting off
both workers let the first run finish, and it runs twice.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from test_faults import RabbitNode, fault_kinds, results_client, wait_until

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(400)]

CANCELLED = ("cannot be acknowledged after a connection loss since late "
             "acknowledgement is enabled for it.")
SETTING = "worker.cancel_long_running_tasks_on_connection_loss"


def run_scenario(kind: str, node: RabbitNode, log_dir, cancel: bool) -> dict:
    broker = harness.BrokerEnv("amqp", node.url)
    spec = harness.WorkerSpec(project="proj_faults", pool="prefork", concurrency=1,
                              extra_flags=("--", f"{SETTING}={str(cancel).lower()}"))
    worker = harness.WorkerProcess(kind, spec, broker, log_dir)
    key = f"ccit.cancel.{uuid.uuid4().hex[:8]}"
    records = results_client()
    worker.start()
    try:
        worker.wait_ready()
        with harness.client_app("proj_faults", worker.env) as app:
            task_id = app.tasks["proj_faults.tasks.late"].apply_async(
                (key, 0, time.time(), 4.0)).id
        wait_until(lambda: records.hlen(f"{key}.runs"), 20, "the task to start")
        time.sleep(0.5)
        seen: list[str] = []

        def watch() -> None:
            raw = records.get(f"celery-task-meta-{task_id}")
            state = json.loads(raw)["status"] if raw else None
            if state and (not seen or seen[-1] != state):
                seen.append(state)

        node.kill()
        node.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            watch()
            if records.llen(f"{key}.done") >= 1 and seen and seen[-1] == "SUCCESS" \
                    and sum(int(v) for v in records.hvals(f"{key}.runs")) >= 2:
                break
            time.sleep(0.02)
        time.sleep(5.0)  # a third run, or the first one finishing late, would show
        watch()
        done = [json.loads(item) for item in records.lrange(f"{key}.done", 0, -1)]
        log = worker.log()
        return {
            "runs_started": sum(int(v) for v in records.hvals(f"{key}.runs")),
            "runs_finished": len(done),
            "finished_redelivered": [entry["redelivered"] for entry in done],
            "states_seen": seen,
            "cancel_line": CANCELLED in log,
            "failed_to_cancel": "Failed to cancel active request" in log,
        }
    finally:
        worker.stop()
        records.delete(f"{key}.runs", f"{key}.starts", f"{key}.done")
        records.close()


@pytest.fixture
def rabbit(redis_available, tmp_path):
    node = RabbitNode(tmp_path)
    node.start()
    try:
        yield node
    finally:
        node.kill()


@pytest.mark.parametrize("cancel", [True, False], ids=["on", "off"])
def test_late_task_running_at_connection_loss(cancel, rabbit, interop_log_dir):
    observed = {kind: run_scenario(kind, rabbit, interop_log_dir, cancel)
                for kind in fault_kinds()}
    reference = observed.get("celery") or observed["ccworker"]
    report = json.dumps(observed, indent=1)
    assert reference["runs_started"] == 2, report
    if cancel:
        assert reference["runs_finished"] == 1, report
        assert reference["finished_redelivered"] == [True], report
        assert reference["cancel_line"], report
    else:
        assert reference["runs_finished"] == 2, report
        assert not reference["cancel_line"], report
    assert reference["states_seen"][-1] == "SUCCESS", report
    assert len({json.dumps(obs, sort_keys=True) for obs in observed.values()}) == 1, report
