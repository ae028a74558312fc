"""``--metrics-port``: Prometheus metrics and health probes of a real ccworker.

ccworker-only (``celery worker`` has no such endpoint), so nothing is
compared: a ccworker subprocess is driven by a real Celery client and its
endpoint read over HTTP, the exposition parsed by ``prometheus_client``.
The stall is a real one: a ``task_received`` receiver that sleeps on the
consumer thread (proj_observe/signals.py).
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PROJECT = "proj_observe"
TASKS = "proj_observe.tasks."


def start_worker(log_dir, pool: str, *flags: str) -> harness.WorkerProcess:
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    spec = harness.WorkerSpec(project=PROJECT, pool=pool, concurrency=2,
                              extra_flags=("--metrics-port", "0", *flags))
    worker = harness.WorkerProcess("ccworker", spec, broker, log_dir).start()
    worker.wait_ready()
    return worker


def endpoint(worker: harness.WorkerProcess) -> str:
    found = re.search(r"Metrics on (http://[^/\s]+)/metrics", worker.log())
    assert found, worker.log_tail()
    return found.group(1)


def get(base: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(base + path, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def probe(base: str, path: str) -> tuple[int, str]:
    status, body = get(base, path)
    return status, json.loads(body)["status"]


def scrape(base: str) -> dict:
    """{(sample name, frozenset of labels): value}."""
    status, text = get(base, "/metrics")
    assert status == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def count(samples: dict, name: str, task: str | None = None) -> float:
    labels = frozenset({("task", TASKS + task)} if task else ())
    return samples.get((name, labels), 0)


def open_gate(worker: harness.WorkerProcess, gate: str) -> None:
    """Let a ``gated`` task of ``worker`` finish."""
    client = redis.Redis.from_url(worker.broker.results_url)
    try:
        client.rpush(gate, "open")
        client.expire(gate, 120)
    finally:
        client.close()


def wait_for(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_counts_probes_reconnect_and_stall(interop_log_dir, redis_available):
    worker = start_worker(interop_log_dir, "threads", "--health-stall-timeout", "2")
    try:
        base = endpoint(worker)
        assert base.startswith("http://127.0.0.1:")  # loopback unless told otherwise
        assert probe(base, "/healthz") == (200, "ok")
        assert probe(base, "/readyz") == (200, "ok")
        assert get(base, "/nothing-here")[0] == 404

        with harness.client_app(PROJECT, worker.env) as app:
            results = [app.send_task(TASKS + "ok", (i,)) for i in range(3)]
            assert [r.get(timeout=20) for r in results] == [0, 1, 2]
            with pytest.raises(ValueError):
                app.send_task(TASKS + "fail").get(timeout=20)
            assert app.send_task(TASKS + "retry_once").get(timeout=20) == "retried"
            rejected = app.send_task(TASKS + "reject")
            wait_for(lambda: rejected.state == "FAILURE", "the Reject to be stored")

            expected = {
                ("ccworker_tasks_received_total", "ok"): 3,
                ("ccworker_tasks_succeeded_total", "ok"): 3,
                ("ccworker_tasks_received_total", "fail"): 1,
                ("ccworker_tasks_failed_total", "fail"): 1,
                # The retry is a new message: received twice, retried once.
                ("ccworker_tasks_received_total", "retry_once"): 2,
                ("ccworker_tasks_retried_total", "retry_once"): 1,
                ("ccworker_tasks_succeeded_total", "retry_once"): 1,
                ("ccworker_tasks_failed_total", "reject"): 1,
                ("ccworker_tasks_rejected_total", "reject"): 1,
                ("ccworker_task_runtime_seconds_count", "ok"): 3,
                ("ccworker_task_runtime_seconds_count", "fail"): 1,
            }

            def counted():
                samples = scrape(base)
                return samples if all(count(samples, name, task) == value
                                      for (name, task), value in expected.items()) else None

            samples = wait_for(counted, f"the counts {expected}")
            assert count(samples, "ccworker_tasks_failed_total", "ok") == 0
            buckets = {dict(labels)["le"]: value for (name, labels), value in samples.items()
                       if name == "ccworker_task_runtime_seconds_bucket"
                       and dict(labels)["task"] == TASKS + "ok"}
            assert buckets["+Inf"] == 3
            assert count(samples, "ccworker_tasks_active") == 0
            assert count(samples, "ccworker_pool_size") == 2
            assert count(samples, "ccworker_prefetch_count") == 8
            assert count(samples, "ccworker_broker_connected") == 1
            assert count(samples, "ccworker_broker_reconnects_total") == 0

            # The broker connection is cut: the worker reconnects and counts it.
            assert harness.kill_redis_connections(worker.pid) >= 1
            wait_for(lambda: count(scrape(base), "ccworker_broker_reconnects_total") >= 1,
                     "a reconnect to be counted")
            assert app.send_task(TASKS + "ok", (7,)).get(timeout=30) == 7
            wait_for(lambda: probe(base, "/readyz") == (200, "ok"), "ready again")

            # A receiver blocking the consumer thread past the stall timeout.
            stalled = app.send_task(TASKS + "stall_on_receipt", (8,))
            wait_for(lambda: probe(base, "/healthz") == (503, "stalled"), "/healthz to fail")
            assert probe(base, "/readyz") == (200, "ok")  # still connected
            assert stalled.get(timeout=30) == 8
            wait_for(lambda: probe(base, "/healthz") == (200, "ok"), "/healthz to recover")
    finally:
        assert worker.stop() == 0, worker.log_tail()


def test_solo_running_a_long_task_is_not_stalled_and_shutdown_is_not_ready(
        interop_log_dir, redis_available):
    worker = start_worker(interop_log_dir, "solo", "--health-stall-timeout", "1")
    try:
        base = endpoint(worker)
        with harness.client_app(PROJECT, worker.env) as app:
            first_gate = f"ccit.gate.{harness.new_token()}"
            long = app.send_task(TASKS + "gated", (first_gate,))
            wait_for(lambda: count(scrape(base), "ccworker_tasks_active") == 1, "the task to run")
            # The loop cannot turn while solo runs the task; that is not a stall.
            time.sleep(2)
            assert probe(base, "/healthz") == (200, "busy")
            open_gate(worker, first_gate)
            assert long.get(timeout=20) is True
            wait_for(lambda: probe(base, "/healthz") == (200, "ok"), "the loop to turn again")

            # Warm shutdown while a task runs: not ready, still alive, exit 0.
            # The task runs until the probes are done (a fixed sleep ended
            # before them once, on a loaded machine, and the worker had gone).
            gate = f"ccit.gate.{harness.new_token()}"
            last = app.send_task(TASKS + "gated", (gate,))
            wait_for(lambda: count(scrape(base), "ccworker_tasks_active") == 1, "the task to run")
            worker.request_stop()
            assert wait_for(lambda: probe(base, "/readyz") == (503, "stopping"),
                            "/readyz to say stopping")
            assert probe(base, "/healthz") == (200, "stopping")
            open_gate(worker, gate)
            assert last.get(timeout=20) is True
    finally:
        assert worker.stop() == 0, worker.log_tail()


def test_a_taken_metrics_port_stops_the_start(interop_log_dir, redis_available):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
        spec = harness.WorkerSpec(project=PROJECT, extra_flags=("--metrics-port", str(port)))
        worker = harness.WorkerProcess("ccworker", spec, broker, interop_log_dir).start()
        try:
            assert worker.proc.wait(60) == 1
            assert f"Cannot serve metrics on 127.0.0.1:{port}" in worker.log()
        finally:
            worker.stop()


def test_json_log_lines_on_prefork(interop_log_dir, redis_available):
    worker = start_worker(interop_log_dir, "prefork", "--log-format", "json")
    try:
        with harness.client_app(PROJECT, worker.env) as app:
            result = app.send_task(TASKS + "log_line", ("hi",))
            assert result.get(timeout=20) == "hi"
            with pytest.raises(ValueError):
                app.send_task(TASKS + "fail").get(timeout=20)
            wait_for(lambda: "succeeded in" in worker.log() and
                     "raised unexpected" in worker.log(), "the outcome lines")
    finally:
        assert worker.stop() == 0, worker.log_tail()
    lines = worker.log().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("{"))
    # Every log line is JSON; Celery prints its shutdown line outside the log.
    body = [line for line in lines[first:] if line.strip() and "Warm shutdown" not in line]
    entries = [json.loads(line) for line in body]
    by_message = {e["message"]: e for e in entries}
    assert f"{worker.nodename} ready." in by_message
    received = next(e for e in entries if e["message"].endswith("received")
                    and e.get("task_name") == TASKS + "log_line")
    assert received["task_id"] == result.id and received["logger"] == "celery.worker.strategy"
    said = next(e for e in entries if e["message"] == "task says hi")
    # From the pool process, through the task logger, with the running task.
    assert (said["level"], said["task_id"], said["task_name"]) == \
        ("WARNING", result.id, TASKS + "log_line")
    assert said["process"].startswith("ForkPoolWorker")
    failed = next(e for e in entries if "raised unexpected" in e["message"])
    assert failed["level"] == "ERROR" and "ValueError: expected failure" in failed["exc_info"]
