"""A project's own bootsteps, beside ``celery worker``.

``proj_steps`` adds the three kinds of step real projects add (its
docstring): a worker step touching a liveness file on the worker's timer,
with its path from a command-line option the project adds; a
``ConsumerStep`` consuming a queue of plain JSON messages on the worker's
connection; a consumer step recording its life. For each broker the same
steps run on both workers and what the project and an operator see is
compared: the order of the steps' calls and what they saw, the liveness
file kept fresh while the worker lives and removed at shutdown, the plain
messages consumed (also after the broker connection was cut, on Redis: the
consumer steps are stopped and started again on the new connection), a
task's result, the exit status.

A step that needs a part of Celery's consumer ccworker does not offer
stops ccworker at start with one line naming it (ccworker only).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Producer

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

PROJECT = "proj_steps"


def publish_plain(worker: harness.WorkerProcess, body: dict) -> None:
    """A message no Celery client would send, to the step's own queue."""
    name = f"{worker.queue}.external"
    with Connection(worker.broker.url) as conn:
        Producer(conn).publish(body, exchange=Exchange("ccit.external", type="direct"),
                               routing_key=name, serializer="json", retry=True)


def external_bodies(worker: harness.WorkerProcess) -> list:
    return [detail["body"] for event, detail in worker.startup_records + worker.recorded()
            if event == "external.message"]


def add(worker: harness.WorkerProcess, x: int, y: int) -> object:
    with harness.client_app(PROJECT, worker.env) as app:
        return app.send_task(f"{PROJECT}.tasks.add", args=(x, y),
                             queue=worker.queue).get(timeout=30)


def steps_stats(worker: harness.WorkerProcess) -> dict:
    """What ``inspect stats`` shows of the steps' ``info`` (names made equal)."""
    with harness.client_app(PROJECT, worker.env) as app:
        replies = app.control.inspect(timeout=5, destination=[worker.nodename]).stats() or {}
    stats = next(iter(replies.values()), {})
    shown = {key: stats.get(key) for key in ("liveness", "lifecycle")}
    if shown["liveness"]:
        shown["liveness"]["file"] = shown["liveness"]["file"].split("-", 1)[-1]
    return shown


def fresh(path: Path, within: float = 3.0) -> bool:
    return path.exists() and time.time() - path.stat().st_mtime < within


def observe(kind: str, pool: str, broker: harness.BrokerEnv, log_dir, tmp: Path) -> dict:
    heartbeat = tmp / f"{kind}-{broker.name}-{pool}.heartbeat"
    spec = harness.WorkerSpec(project=PROJECT, pool=pool, concurrency=2,
                              extra_flags=("--heartbeat-file", str(heartbeat)))
    worker = harness.WorkerProcess(kind, spec, broker, log_dir).start()
    seen: dict = {}
    try:
        worker.wait_ready()
        seen["calls until ready"] = worker.startup_records
        seen["liveness file fresh"] = harness.wait_until(lambda: fresh(heartbeat), 10)
        first = heartbeat.stat().st_mtime
        seen["liveness file touched again"] = harness.wait_until(
            lambda: heartbeat.stat().st_mtime > first, 10)
        publish_plain(worker, {"n": 1})
        seen["plain message consumed"] = harness.wait_until(
            lambda: external_bodies(worker) == [{"n": 1}], 20)
        seen["task result"] = add(worker, 2, 3)
        seen["stats of the steps"] = steps_stats(worker)
        if broker.name == "redis":
            seen["connections cut"] = harness.kill_redis_connections(worker.pid) > 0
            harness.wait_until(
                lambda: sum(e == "lifecycle.start" for e, _ in worker.recorded()) >= 1, 30)
            publish_plain(worker, {"n": 2})
            seen["plain message consumed after the cut"] = harness.wait_until(
                lambda: external_bodies(worker) == [{"n": 1}, {"n": 2}], 30)
            seen["task result after the cut"] = add(worker, 4, 5)
            seen["calls at the cut"] = [e for e, _ in worker.recorded()
                                        if e != "external.message"]
        seen["queue drained"] = broker.queue_depth(f"{worker.queue}.external") == 0
    finally:
        seen["exit status"] = worker.stop()
    seen["calls at shutdown"] = [e for e, _ in worker.recorded() if e != "external.message"]
    seen["liveness file removed"] = not heartbeat.exists()
    return seen


@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent", "solo"])
def test_project_steps_run_as_in_celery(pool, broker, interop_log_dir, tmp_path):
    observed = {kind: observe(kind, pool, broker, interop_log_dir, tmp_path)
                for kind in harness.selected_kinds()}
    reference = observed.get("celery", next(iter(observed.values())))
    assert reference["liveness file fresh"] and reference["liveness file removed"]
    assert reference["plain message consumed"] and reference["task result"] == 5
    assert reference["stats of the steps"] == {
        "liveness": {"file": f"{broker.name}-{pool}.heartbeat"},
        "lifecycle": {"connected": True}}
    for seen in observed.values():
        assert seen == reference


def test_a_step_needing_what_ccworker_lacks_fails_at_start(redis_available,
                                                           interop_log_dir):
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    spec = harness.WorkerSpec(project=PROJECT, pool="threads",
                              env=(("CC_TEST_STEP_WANTS", "qos"),))
    worker = harness.WorkerProcess("ccworker", spec, broker, interop_log_dir).start()
    try:
        worker.proc.wait(60)
    finally:
        worker.kill()
    assert worker.proc.returncode == 1
    log = worker.log()
    assert "Unrecoverable error: MissingPart(\"ccworker's consumer has no 'qos'" in log, log
    assert f"{worker.nodename} ready." not in log
