"""The worker's metrics on ``prometheus_client``: callback gauges, the
project's own metrics (multiprocess mode included), the hooks and probes.

The exposition is read back with ``prometheus_client``'s own parser.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import Counter as ProjectCounter
from prometheus_client.parser import text_string_to_metric_families

from celerycompat.execution.outcome import Outcome, Settle, State
from celerycompat.observability import health
from celerycompat.observability.metrics import (
    CallbackGauges,
    ProjectMetrics,
    exposition,
)
from celerycompat.observability.worker_metrics import PREFIX, WorkerMetrics


def parse(text: str | bytes) -> dict:
    """{family name: {(sample name, sorted label pairs): value}} via prometheus_client."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = {
            (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples
        }
    return out


# -- the pieces on top of prometheus_client ------------------------------------------------


def test_callback_gauges_are_read_at_every_scrape():
    registry = CollectorRegistry(auto_describe=False)
    gauges = CallbackGauges()
    registry.register(gauges)
    box = {"n": 1}
    gauges.add("g", "A gauge.", lambda: box["n"])
    gauges.add("g_labelled", "Labelled.", lambda: {("a",): 1, ("b",): 2.5}, ["k"])
    assert parse(exposition(registry))["g"] == {("g", ()): 1}
    box["n"] = 7
    parsed = parse(exposition(registry))
    assert parsed["g"] == {("g", ()): 7}
    assert parsed["g_labelled"] == {("g_labelled", (("k", "a"),)): 1,
                                    ("g_labelled", (("k", "b"),)): 2.5}


def test_the_projects_own_metrics_are_served_beside_the_workers():
    counter = ProjectCounter("proj_test_orders_total", "Orders seen by a task.")
    try:
        counter.inc(3)
        metrics = WorkerMetrics()
        parsed = parse(metrics.render())
        assert parsed["proj_test_orders"][("proj_test_orders_total", ())] == 3
        assert "ccworker_tasks_received" in parsed
        alone = parse(WorkerMetrics(project_metrics=False).render())
        assert "proj_test_orders" not in alone
    finally:
        REGISTRY.unregister(counter)


CHILD = """
import sys
from prometheus_client import Counter
Counter("proj_child_jobs_total", "Jobs.", ["kind"]).labels("a").inc(int(sys.argv[1]))
Counter("ccworker_tasks_received_total", "A worker family in the files.").inc()
"""


def test_multiprocess_mode_adds_up_the_pool_processes(tmp_path):
    """Prefork runs tasks in children: with PROMETHEUS_MULTIPROC_DIR their
    files are added up, and the worker's own families (written there too in
    that mode) are served once, from the worker's registry."""
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path))
    children = [subprocess.run([sys.executable, "-c", CHILD, str(n)], env=env, check=True)
                for n in (2, 5)]
    assert len(children) == 2
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProjectMetrics(PREFIX, str(tmp_path)))
    parsed = parse(exposition(registry))
    assert parsed["proj_child_jobs"][("proj_child_jobs_total", (("kind", "a"),))] == 7
    assert not [name for name in parsed if name.startswith(PREFIX)]


# -- the worker's hooks ------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def request(name: str, time_start: float | None = 100.0):
    return SimpleNamespace(message=SimpleNamespace(name=name), time_start=time_start)


class FakeConsumer:
    """The attributes of a Consumer the gauges and probes read."""

    def __init__(self, runs_inline: bool = False) -> None:
        self.reserved = [1, 2]
        self.active = {1: "a"}
        self.rate_limits = None
        self.prefetch_count = 8
        self.pool = SimpleNamespace(limit=2, runs_inline=runs_inline)
        self.broker = object()
        self.should_stop = False

    def scheduled_requests(self):
        return ["eta"] * 3

    def reserved_requests(self):
        return list(self.reserved)

    def running_count(self):
        return len(self.active)


def test_outcomes_are_counted_as_the_task_events_report_them():
    metrics = WorkerMetrics(wall_clock=lambda: 102.5)
    metrics.received(request("t"))
    metrics.finished(request("t"), Outcome(State.SUCCESS, runtime=0.2), Settle.ACK)
    metrics.finished(request("t"), Outcome(State.FAILURE), Settle.NOTHING)
    metrics.finished(request("t"), Outcome(State.RETRY), Settle.NOTHING)
    metrics.finished(request("t"), Outcome(State.REJECTED, requeue=False), Settle.DROP)
    metrics.finished(request("t"), Outcome(State.REJECTED, requeue=True), Settle.REQUEUE)
    # A lost task requeued (acks_late + reject_on_worker_lost) has not failed.
    metrics.finished(request("t"), Outcome(State.FAILURE, is_worker_lost=True, requeue=True),
                     Settle.REQUEUE)
    metrics.finished(request("t"), Outcome(State.IGNORED), Settle.NOTHING)
    metrics.revoked(request("t"), expired=True)
    parsed = parse(metrics.render())

    def count(family):
        return parsed[family].get((f"{family}_total", (("task", "t"),)), 0)

    assert count("ccworker_tasks_received") == 1
    assert count("ccworker_tasks_succeeded") == 1
    assert count("ccworker_tasks_failed") == 2  # the exception, the Reject without requeue
    assert count("ccworker_tasks_retried") == 1
    assert count("ccworker_tasks_rejected") == 3  # DROP, REQUEUE, the lost one requeued
    assert count("ccworker_tasks_revoked") == 1
    assert count("ccworker_tasks_ignored") == 1
    runtime = parsed["ccworker_task_runtime_seconds"]
    assert runtime[("ccworker_task_runtime_seconds_count", (("task", "t"),))] == 7
    # SUCCESS: the runner's own runtime; others: from the start to the outcome.
    assert runtime[("ccworker_task_runtime_seconds_sum", (("task", "t"),))] == \
        pytest.approx(0.2 + 6 * 2.5)


def test_reconnects_count_connections_after_the_first():
    metrics = WorkerMetrics()
    metrics.connected(None)
    assert metrics.reconnects_total._value.get() == 0
    metrics.connected(None)
    metrics.connected(None)
    assert metrics.reconnects_total._value.get() == 2


def test_gauges_read_the_consumer_and_info_labels():
    clock = Clock()
    metrics = WorkerMetrics(info={"version": "1", "nodename": "w@h"}, clock=clock,
                            project_metrics=False)
    metrics.watch(FakeConsumer())
    clock.now += 4
    parsed = parse(metrics.render())
    assert parsed["ccworker_tasks_reserved"] == {("ccworker_tasks_reserved", ()): 2}
    assert parsed["ccworker_tasks_active"] == {("ccworker_tasks_active", ()): 1}
    assert parsed["ccworker_tasks_scheduled"] == {("ccworker_tasks_scheduled", ()): 3}
    assert parsed["ccworker_tasks_waiting_rate_limit"] == \
        {("ccworker_tasks_waiting_rate_limit", ()): 0}
    assert parsed["ccworker_prefetch_count"] == {("ccworker_prefetch_count", ()): 8}
    assert parsed["ccworker_pool_size"] == {("ccworker_pool_size", ()): 2}
    assert parsed["ccworker_broker_connected"] == {("ccworker_broker_connected", ()): 1}
    assert parsed["ccworker_consumer_seconds_since_turn"] == \
        {("ccworker_consumer_seconds_since_turn", ()): 4}
    assert parsed["ccworker_info"] == \
        {("ccworker_info", (("nodename", "w@h"), ("version", "1"))): 1}
    assert all(name.startswith("ccworker_") for name in parsed)


# -- probes ------------------------------------------------------------------------------


def live(**kw):
    args = dict(now=100.0, last_turn=99.0, stall_timeout=10.0, connected=True,
                running_inline=False, stopping=False)
    args.update(kw)
    return health.liveness(**args)


def test_liveness_fails_only_for_a_stalled_consumer():
    assert live().ok and live().status == "ok"
    stalled = live(last_turn=80.0)
    assert not stalled.ok and stalled.status == "stalled"
    assert "20.0s" in stalled.detail
    # Not stalled: reconnecting, a task inline on solo, shutting down.
    assert live(last_turn=0.0, connected=False).status == "reconnecting"
    assert live(last_turn=0.0, running_inline=True).status == "busy"
    assert live(last_turn=0.0, stopping=True).status == "stopping"
    assert all(live(last_turn=0.0, **kw).ok for kw in
               ({"connected": False}, {"running_inline": True}, {"stopping": True}))


def test_readiness_wants_started_connected_and_not_stopping():
    def ready(**kw):
        args = dict(started=True, connected=True, stopping=False)
        args.update(kw)
        return health.readiness(**args)

    assert ready().ok
    assert (ready(started=False).ok, ready(started=False).status) == (False, "starting")
    assert (ready(connected=False).ok, ready(connected=False).status) == \
        (False, "reconnecting")
    assert (ready(stopping=True).ok, ready(stopping=True).status) == (False, "stopping")


def test_worker_metrics_probes_follow_the_consumer():
    clock = Clock()
    metrics = WorkerMetrics(stall_timeout=5, clock=clock)
    assert metrics.liveness().ok and not metrics.readiness().ok  # not built yet
    consumer = FakeConsumer()
    metrics.watch(consumer)
    metrics.turned()
    assert not metrics.readiness().ok  # worker_ready not sent yet
    metrics.ready()
    assert metrics.readiness().ok and metrics.liveness().ok
    clock.now += 6
    assert metrics.liveness().status == "stalled"
    consumer.pool.runs_inline = True  # solo: the running task is the loop's turn
    assert metrics.liveness().status == "busy"
    consumer.active = {}
    assert metrics.liveness().status == "stalled"
    metrics.turned()
    assert metrics.liveness().ok
    consumer.broker = None
    assert metrics.readiness().status == "reconnecting"
    consumer.should_stop = True
    assert metrics.readiness().status == "stopping"
