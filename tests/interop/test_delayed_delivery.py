"""Native delayed delivery on quorum queues (Celery >= 5.5; issue 15, item 2).

A Celery >= 5.5 client sends a countdown task bound for a quorum queue on a
topic exchange through the ``celery_delayed_*`` exchanges, which only the
worker's ``DelayedDelivery`` step declares and binds. Each side runs alone on
a fresh RabbitMQ vhost (so no exchange is left by the other), and what a
client and an operator see is compared: the countdown task's result, that it
did not run before its countdown, the delayed-delivery exchanges that exist,
and the worker's lines about delayed delivery. On a direct exchange (Celery's
default) the client warns and publishes as usual; both workers then run the
task and log the same.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import subprocess
from typing import Iterator

import pytest

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

PROJECT = "proj_quorum"
COUNTDOWN = 2


@contextlib.contextmanager
def fresh_vhost() -> Iterator[str]:
    vhost = harness.RabbitVhost()
    if not vhost.available:
        pytest.fail("this test needs rabbitmqctl to create a fresh vhost")
    try:
        yield vhost.create()
    finally:
        vhost.delete()


def delayed_exchanges(vhost_url: str) -> list[str]:
    """The ``celery_delayed_*`` exchanges of the vhost (rabbitmqctl)."""
    name = vhost_url.rsplit("/", 1)[1]
    ctl = harness.RabbitVhost().ctl
    done = subprocess.run([*ctl, "list_exchanges", "-p", name, "name", "--formatter", "json"],
                          check=True, capture_output=True, text=True, timeout=60)
    rows = json.loads(done.stdout)
    return sorted(row["name"] for row in rows if row["name"].startswith("celery_delayed_"))


def delivery_lines(log: str) -> list[str]:
    """The worker's log lines about delayed delivery, without their timestamps."""
    return sorted({line.split("] ", 1)[-1] for line in log.splitlines()
                   if "delayed delivery" in line.lower() or "direct exchange" in line.lower()})


def observe(kind: str, exchange_type: str, log_dir) -> dict:
    seen: dict = {}
    with fresh_vhost() as url:
        broker = harness.BrokerEnv("amqp", url)
        spec = harness.WorkerSpec(project=PROJECT, pool="threads", concurrency=2,
                                  env=(("CC_TEST_EXCHANGE_TYPE", exchange_type),))
        worker = harness.WorkerProcess(kind, spec, broker, log_dir).start()
        try:
            worker.wait_ready()
            with harness.client_app(PROJECT, worker.env) as app:
                sent = dt.datetime.now(dt.timezone.utc)
                result = app.tasks[f"{PROJECT}.tasks.add"].apply_async(
                    (2, 3), countdown=COUNTDOWN)
                seen["result"] = result.get(timeout=60)
                meta = app.backend.get_task_meta(result.id)
                done = meta["date_done"]
                if isinstance(done, str):
                    done = dt.datetime.fromisoformat(done)
                if done.tzinfo is None:
                    done = done.replace(tzinfo=dt.timezone.utc)
                seen["not before its countdown"] = (done - sent).total_seconds() >= COUNTDOWN
            seen["delayed exchanges"] = delayed_exchanges(url)
            seen["lines"] = [line.replace(worker.queue, "<queue>")
                             for line in delivery_lines(worker.log())]
        finally:
            worker.stop()
    return seen


@pytest.mark.parametrize("exchange_type", ["topic", "direct"])
def test_countdown_tasks_on_quorum_queues_with_only_this_worker(
        exchange_type, amqp_broker_url, interop_log_dir):
    observed = {kind: observe(kind, exchange_type, interop_log_dir)
                for kind in ("celery", "ccworker")}
    assert observed["ccworker"] == observed["celery"]
    cc = observed["ccworker"]
    assert cc["result"] == 5 and cc["not before its countdown"]
    # kombu's ladder: celery_delayed_0 .. _27, and the delivery exchange.
    assert len(cc["delayed exchanges"]) == 29
    assert {"celery_delayed_27", "celery_delayed_delivery"} <= set(cc["delayed exchanges"])
    assert not any("Failed" in line for line in cc["lines"])
