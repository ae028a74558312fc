"""Migrating a cluster one worker at a time: a Celery worker and a ccworker share a queue.

Under a steady stream of tasks, the Celery worker is stopped with SIGTERM
(a warm shutdown) mid-run, as an operator replacing it does. Every task
completes exactly once (its runs are counted per task id), both workers
answer a broadcast ``ping`` while both are alive, the ccworker alone after,
and the ccworker took over the queue. Redis and RabbitMQ.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

PROJECT = "proj_migrate"
RATE = 25  # tasks a second
SECONDS = 8


@pytest.mark.parametrize("broker_name", ["redis", "amqp"])
def test_celery_worker_replaced_under_load(broker_name, request, interop_log_dir):
    if broker_name == "redis":
        request.getfixturevalue("redis_available")
        broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    else:
        url, shared = request.getfixturevalue("amqp_broker_url")
        broker = harness.BrokerEnv("amqp", url, fallback_shared_vhost=shared)
    queue = f"ccit.migrate.{harness.new_token()}"
    spec = harness.WorkerSpec(project=PROJECT, pool="threads", concurrency=2,
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
        with harness.client_app(PROJECT, env) as app:
            work = app.tasks[f"{PROJECT}.tasks.work"]
            results: list = []
            stop = threading.Event()

            def produce() -> None:
                while not stop.is_set() and len(results) < RATE * SECONDS:
                    results.append(work.apply_async((queue, 0.05)))
                    time.sleep(1.0 / RATE)

            producer = threading.Thread(target=produce, daemon=True)
            producer.start()
            time.sleep(2.0)
            both = app.control.ping(timeout=2.0,
                                    destination=[celery_worker.nodename, ccworker.nodename])
            celery_worker.request_stop()  # SIGTERM mid-stream: warm shutdown
            assert celery_worker.stop(timeout=60) == 0
            producer.join(SECONDS + 10)
            stop.set()
            after = app.control.ping(timeout=2.0,
                                     destination=[celery_worker.nodename, ccworker.nodename])
            hosts = [result.get(timeout=60) for result in results]
            time.sleep(1.0)  # room for a duplicate delivery to show
        runs = {k.decode(): int(v) for k, v in store.hgetall(f"ccit.migrate.runs.{queue}").items()}
        sent = {result.id for result in results}
    finally:
        celery_worker.stop()
        ccworker.stop()
        store.delete(f"ccit.migrate.runs.{queue}")
        store.close()
    assert {node for reply in both for node in reply} == {celery_worker.nodename,
                                                         ccworker.nodename}
    assert {node for reply in after for node in reply} == {ccworker.nodename}
    assert set(runs) >= sent
    duplicates = {task_id: count for task_id, count in runs.items()
                  if task_id in sent and count != 1}
    assert not duplicates, f"tasks not run exactly once: {duplicates}"
    assert celery_worker.nodename in hosts and ccworker.nodename in hosts
    # After the Celery worker left, the ccworker ran the rest of the stream.
    assert hosts[-1] == ccworker.nodename
