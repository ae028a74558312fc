"""Gossip beside a Celery worker (G5): elections and lost nodes.

A Celery worker and a ccworker run with gossip and heartbeats on (Celery's
defaults). An ``election`` broadcast (``app.control.election`` with a task
signature as its action) makes exactly one node of the two run the task,
whichever wins; then the Celery worker is killed (SIGKILL: no offline
event) and the ccworker logs ``missed heartbeat from <node>`` as a Celery
worker does. Redis and RabbitMQ.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PROJECT = "proj_migrate"


class GossipSpec(harness.WorkerSpec):
    """The harness's flags with gossip and heartbeats left on."""

    def flags(self, nodename: str) -> list[str]:
        return [flag for flag in super().flags(nodename)
                if flag not in ("--without-gossip", "--without-heartbeat")]


@pytest.mark.parametrize("broker_name", ["redis", "amqp"])
def test_election_and_lost_node(broker_name, request, interop_log_dir):
    if broker_name == "redis":
        request.getfixturevalue("redis_available")
        broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    else:
        url, shared = request.getfixturevalue("amqp_broker_url")
        broker = harness.BrokerEnv("amqp", url, fallback_shared_vhost=shared)
    queue = f"ccit.gossip.{harness.new_token()}"
    spec = GossipSpec(project=PROJECT, pool="threads", concurrency=2,
                      env=(("CC_TEST_QUEUE", queue),))
    celery_worker = harness.WorkerProcess("celery", spec, broker, interop_log_dir).start()
    ccworker = harness.WorkerProcess("ccworker", spec, broker, interop_log_dir).start()
    request.node._cc_workers = [celery_worker, ccworker]
    store = redis.Redis.from_url(broker.results_url)
    env = {"CC_TEST_BROKER": broker.url, "CC_TEST_BACKEND": broker.results_url,
           "CC_TEST_QUEUE": queue, "CC_TEST_RECORD_URL": broker.results_url}
    try:
        celery_worker.wait_ready()
        ccworker.wait_ready()
        time.sleep(5.0)  # a couple of heartbeats: each node knows the other is alive
        with harness.client_app(PROJECT, env) as app:
            action = app.signature(f"{PROJECT}.tasks.work", args=(queue, 0), queue=queue)
            app.control.election(f"elect-{queue}", "task", action=dict(action))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not store.hlen(f"ccit.migrate.runs.{queue}"):
                time.sleep(0.1)
            time.sleep(2.0)  # room for a second, wrong, run
            runs = store.hlen(f"ccit.migrate.runs.{queue}")
        logs = celery_worker.log() + ccworker.log()
        assert runs == 1
        assert logs.count("I won the election") == 1
        os.killpg(celery_worker.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        missed = f"missed heartbeat from {celery_worker.nodename}"
        while time.monotonic() < deadline and missed not in ccworker.log():
            time.sleep(0.2)
        assert missed in ccworker.log()
        assert ccworker.alive()
    finally:
        celery_worker.stop()
        ccworker.stop()
        store.delete(f"ccit.migrate.runs.{queue}")
        store.close()
