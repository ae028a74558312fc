"""The metrics registry, the Prometheus text format, the worker's hooks and probes.

The exposition format is checked with ``prometheus_client``'s own parser
(installed with Flower), so "Prometheus can read it" is tested by a reader
that is not ours.
"""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from celerycompat.execution.outcome import Outcome, Settle, State
from celerycompat.observability import health
from celerycompat.observability.metrics import (
    Counter,
    Histogram,
    Registry,
    escape_label_value,
    format_bound,
    format_value,
)
from celerycompat.observability.worker_metrics import WorkerMetrics


def parse(text: str) -> dict:
    """{family name: {(sample name, sorted label pairs): value}} via prometheus_client."""
    out = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = {
            (s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples
        }
    return out


# -- format ----------------------------------------------------------------------------


@pytest.mark.parametrize("value, text", [
    (0, "0"), (3, "3"), (2.0, "2"), (0.25, "0.25"), (1e-05, "1e-05"),
    (math.inf, "+Inf"), (-math.inf, "-Inf"), (math.nan, "NaN"), (True, "1"),
])
def test_values_are_written_as_prometheus_reads_them(value, text):
    assert format_value(value) == text


def test_bucket_bounds_are_floats():
    assert [format_bound(b) for b in (0.005, 1, 10.0, math.inf)] == \
        ["0.005", "1.0", "10.0", "+Inf"]


def test_label_values_are_escaped():
    assert escape_label_value('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


def test_counter_exposition_round_trips_through_prometheus_parser():
    registry = Registry()
    counter = registry.counter("ccworker_tasks_received_total", "Tasks\nreceived.", ["task"])
    counter.inc("proj.add")
    counter.inc("proj.add", amount=2)
    counter.inc('odd"name\\with\nbreaks')
    text = registry.render()
    assert "# HELP ccworker_tasks_received_total Tasks\\nreceived.\n" in text
    assert "# TYPE ccworker_tasks_received_total counter\n" in text
    assert 'ccworker_tasks_received_total{task="proj.add"} 3\n' in text
    parsed = parse(text)["ccworker_tasks_received"]
    assert parsed[("ccworker_tasks_received_total", (("task", "proj.add"),))] == 3
    assert parsed[("ccworker_tasks_received_total",
                   (("task", 'odd"name\\with\nbreaks'),))] == 1


def test_counter_refuses_to_go_down_and_checks_labels():
    counter = Counter("x_total", "x", ["task"])
    with pytest.raises(ValueError):
        counter.inc("a", amount=-1)
    with pytest.raises(ValueError):
        counter.inc()
    with pytest.raises(ValueError):
        Counter("bad name", "x")
    with pytest.raises(ValueError):
        Counter("x_total", "x", ["le"])


def test_names_are_unique_in_a_registry():
    registry = Registry()
    registry.counter("x_total", "x")
    with pytest.raises(ValueError):
        registry.counter("x_total", "again")


def test_histogram_buckets_are_cumulative_with_sum_and_count():
    registry = Registry()
    hist = registry.histogram("ccworker_task_runtime_seconds", "Run time.", ["task"],
                              buckets=(0.1, 1, 10))
    for value in (0.05, 0.1, 0.5, 5, 50):
        hist.observe(value, "t")
    parsed = parse(registry.render())["ccworker_task_runtime_seconds"]

    def bucket(le):
        return parsed[("ccworker_task_runtime_seconds_bucket", (("le", le), ("task", "t")))]

    # ``le`` is inclusive: 0.1 falls in the 0.1 bucket.
    assert [bucket(le) for le in ("0.1", "1.0", "10.0", "+Inf")] == [2, 3, 4, 5]
    assert parsed[("ccworker_task_runtime_seconds_count", (("task", "t"),))] == 5
    assert parsed[("ccworker_task_runtime_seconds_sum", (("task", "t"),))] == \
        pytest.approx(55.65)


def test_histogram_needs_distinct_finite_buckets():
    with pytest.raises(ValueError):
        Histogram("h", "h", buckets=(1, 1))
    with pytest.raises(ValueError):
        Histogram("h", "h", buckets=(math.inf,))


def test_gauges_are_read_at_render_time():
    registry = Registry()
    box = {"n": 1}
    registry.gauge("g", "A gauge.", lambda: box["n"])
    registry.gauge("g_labelled", "Labelled.", lambda: {("a",): 1, ("b",): 2.5}, ["k"])
    assert "g 1\n" in registry.render()
    box["n"] = 7
    text = registry.render()
    assert "g 7\n" in text
    assert parse(text)["g_labelled"] == {("g_labelled", (("k", "a"),)): 1,
                                         ("g_labelled", (("k", "b"),)): 2.5}


def test_updates_from_many_threads_are_not_lost():
    registry = Registry()
    counter = registry.counter("c_total", "c", ["task"])
    hist = registry.histogram("h", "h", ["task"])

    def work():
        for _ in range(2000):
            counter.inc("t")
            hist.observe(0.01, "t")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    parsed = parse(registry.render())
    assert parsed["c"][("c_total", (("task", "t"),))] == 8000
    assert parsed["h"][("h_count", (("task", "t"),))] == 8000


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
    metrics.connected()
    assert metrics.reconnects_total.value() == 0
    metrics.connected()
    metrics.connected()
    assert metrics.reconnects_total.value() == 2


def test_gauges_read_the_consumer_and_info_labels():
    clock = Clock()
    metrics = WorkerMetrics(info={"version": "1", "nodename": "w@h"}, clock=clock)
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
