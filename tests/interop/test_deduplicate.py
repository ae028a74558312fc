"""``worker_deduplicate_successful_tasks``: a redelivered acks_late message whose
task already succeeded is acked without running again (Celery >= 5.1).

Redis, where a redelivery can be made by hand: a copy of a task's own
message is taken off a queue nobody consumes, marked ``redelivered`` as
kombu marks a restored message (in its headers and delivery info), and
pushed onto the worker's queue. Three copies: of a task that succeeded (not
run: "ignored" in the log, no signals, the stored result unchanged), of a
task that failed (run again) and of a task never run (run). Compared with
``celery worker`` under the same flags.
"""

from __future__ import annotations

import json
import time

import pytest

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

FLAGS = ("--", "worker.deduplicate_successful_tasks=true", "task.acks_late=true")


def redelivered_copy(observe, name: str, args: tuple, task_id: str, **options) -> None:
    """Push a ``redelivered`` copy of the message ``name(*args)`` with ``task_id``."""
    hold = f"{observe.queue}.hold"
    observe.app.send_task(observe.task_name(name), args, task_id=task_id, queue=hold,
                          **options)
    client = observe.broker.redis_client()
    try:
        raw = None
        deadline = time.monotonic() + 5
        while raw is None and time.monotonic() < deadline:
            raw = client.rpop(hold)
        assert raw is not None, "the copy never reached its holding queue"
        envelope = json.loads(raw)
        envelope["headers"]["redelivered"] = True
        envelope["properties"]["delivery_info"]["redelivered"] = True
        envelope["properties"]["delivery_info"]["routing_key"] = observe.queue
        client.lpush(observe.queue, json.dumps(envelope))
    finally:
        client.close()


def scenario(app, observe) -> None:
    done = observe.send("add", (2, 3))
    observe.get_and_meta(done, "first")
    failed = observe.send("fail")
    observe.get_and_meta(failed, "failed-first")
    never = observe.new_id()

    redelivered_copy(observe, "add", (2, 3), done.id)
    redelivered_copy(observe, "fail", (), failed.id)
    redelivered_copy(observe, "add", (4, 4), never)
    observe.record("settled", observe.settle())
    observe.meta(done.id, "done-after")
    observe.meta(never, "never-run-after")
    observe.queue_depth("queue")
    observe.records("records")
    observe.log_problems("log")


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_redelivered_success_is_not_run_again(broker, run_differential):
    celery_obs, cc_obs = run_differential(scenario, broker, extra_flags=FLAGS)
    assert celery_obs["first"]["value"] == 5
    assert celery_obs["never-run-after.raw"]["result"] == 8
    # add, fail, fail again, the never-run add; not the duplicate add.
    assert str(celery_obs["records"]).count('"task_prerun"') == 4, celery_obs["records"]
    assert celery_obs == cc_obs


def test_success_stored_elsewhere(redis_available, run_differential):
    """SUCCESS stored by another worker (here: written by the client): the
    copy is not run, Celery's INFO line names it, and its link callback,
    which the stored meta shows was never sent (no children), is sent now
    with the stored result."""
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))

    def elsewhere(app, observe) -> None:
        task_id, callback_id = observe.new_id(), observe.new_id()
        app.backend.mark_as_done(task_id, 7)
        callback = app.signature(observe.task_name("add"), (100,)).set(task_id=callback_id)
        redelivered_copy(observe, "add", (3, 4), task_id, link=callback)
        observe.record("settled", observe.settle())
        observe.poll_meta(callback_id, "callback")
        observe.meta(task_id, "stored")
        observe.records("records")
        log = observe.worker.log()
        observe.record("ignored", [
            line.split("] ", 1)[1] for line in log.splitlines()
            if "already completed successfully" in line])

    celery_obs, cc_obs = run_differential(elsewhere, broker, extra_flags=FLAGS)
    ignored = celery_obs["ignored"]
    assert len(ignored) == 1 and ignored[0].startswith("Task proj_basic.tasks.add["), ignored
    assert celery_obs["callback[0]"]["result"] == 107
    assert celery_obs == cc_obs
