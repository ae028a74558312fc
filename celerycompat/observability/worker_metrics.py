"""The worker's metrics: what the consumer reports, what a scrape reads.

The consumer calls five hooks on its own thread, at the moments it sends
the matching task events (events/task_events.py): `received`, `finished`,
`revoked`, plus `connected` after every (re)connection and `turned` once
per loop turn. Each hook is a dictionary update under a lock; nothing here
blocks or does I/O. Gauges (reserved, active, scheduled...) are not pushed
at all: they are read from the consumer when Prometheus scrapes.

The families are ``prometheus_client`` counters and histograms in a
registry of the worker's own (observability/metrics.py), next to the
project's own metrics; per-task label children are looked up once per task
name, so a hook costs a dictionary lookup and one locked add.

Counts follow the task events a monitor such as Flower sees (same moments,
same outcome rules), whether or not ``-E`` is on and whatever a task's
``send_events``: ``failed`` counts ``task-failed`` (an exception, an
internal error, a ``Reject`` without requeue; not a lost task that is
requeued), ``rejected`` counts ``task-rejected`` (the message was rejected
or requeued), ``revoked`` counts ``task-revoked`` (revoked or expired, on
receipt or just before the start).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram

from celerycompat.execution.outcome import Outcome, Settle, State
from celerycompat.observability.health import Probe, liveness, readiness
from celerycompat.observability.metrics import (
    DEFAULT_BUCKETS,
    CallbackGauges,
    ProjectMetrics,
    exposition,
    multiproc_dir,
)

PREFIX = "ccworker_"


class PerTask:
    """A metric labelled by task name, its label children cached by name
    (``labels()`` takes the metric's lock and builds a key every call)."""

    def __init__(self, metric: Counter | Histogram) -> None:
        self.metric = metric
        self._children: dict[str, Any] = {}

    def child(self, task: str) -> Any:
        found = self._children.get(task)
        if found is None:
            found = self._children[task] = self.metric.labels(task)
        return found


class WorkerMetrics:
    """Metric families of one worker, the consumer hooks, and the probe inputs."""

    def __init__(self, *, info: Mapping[str, str] | None = None,
                 stall_timeout: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time,
                 project_metrics: bool = True) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self.stall_timeout = float(stall_timeout)
        self.registry = registry = CollectorRegistry(auto_describe=False)
        self.gauges = gauges = CallbackGauges()
        registry.register(gauges)
        if project_metrics:
            registry.register(ProjectMetrics(PREFIX, multiproc_dir()))
        self.last_turn = clock()
        self.connections = 0
        self.started = False
        self._consumer: Any = None
        labels = dict(info or {})
        started_at = wall_clock()
        gauges.add(PREFIX + "info", "Version and identity of this worker (always 1).",
                   (lambda: {tuple(labels.values()): 1}) if labels else (lambda: 1),
                   labels=tuple(labels))
        gauges.add(PREFIX + "start_time_seconds",
                   "When this worker started, in seconds since the epoch.",
                   lambda: started_at)

        def per_task(name: str, documentation: str) -> PerTask:
            return PerTask(Counter(PREFIX + name, documentation, ("task",), registry=registry))

        self.received_total = per_task("tasks_received_total",
                                       "Tasks received (task-received events).")
        self.succeeded_total = per_task("tasks_succeeded_total", "Tasks that succeeded.")
        self.failed_total = per_task(
            "tasks_failed_total",
            "Tasks that failed: an exception, an internal error, a Reject without requeue.")
        self.retried_total = per_task("tasks_retried_total", "Tasks that asked to be retried.")
        self.rejected_total = per_task(
            "tasks_rejected_total",
            "Task messages rejected or requeued after the run (task-rejected events).")
        self.revoked_total = per_task(
            "tasks_revoked_total", "Tasks discarded as revoked or expired (task-revoked events).")
        self.ignored_total = per_task(
            "tasks_ignored_total", "Tasks that raised Ignore (task.replace() among them).")
        self.runtime = PerTask(Histogram(
            PREFIX + "task_runtime_seconds",
            "Task run time: the time Celery logs in 'succeeded in', or from the start "
            "to the outcome for other outcomes.", ("task",), buckets=DEFAULT_BUCKETS,
            registry=registry))
        self.reconnects_total = Counter(
            PREFIX + "broker_reconnects_total",
            "Broker connections re-established after a loss.", registry=registry)

    # -- what the consumer state says, read at scrape time --------------------------

    def watch(self, consumer: Any) -> None:
        """Add the gauges read from ``consumer`` (and its pool) at every scrape."""
        self._consumer = consumer
        gauge = self.gauges.add
        gauge(PREFIX + "tasks_reserved",
              "Prefetched tasks waiting for a pool slot (inspect reserved).",
              lambda: len(consumer.reserved_requests()))
        gauge(PREFIX + "tasks_active", "Tasks running (inspect active).",
              consumer.running_count)
        gauge(PREFIX + "tasks_scheduled",
              "Tasks held un-acked until their ETA or countdown (inspect scheduled).",
              lambda: len(consumer.scheduled_requests()))
        gauge(PREFIX + "tasks_waiting_rate_limit",
              "Tasks held until their type's rate limit lets them start.",
              lambda: len(consumer.rate_limits) if consumer.rate_limits is not None else 0)
        gauge(PREFIX + "prefetch_count",
              "Un-acked messages the worker lets the broker send it (inspect stats "
              "prefetch_count; 0 means no limit).",
              lambda: consumer.prefetch_count)
        gauge(PREFIX + "pool_size", "Pool slots (concurrency).", lambda: consumer.pool.limit)
        gauge(PREFIX + "broker_connected", "1 while connected to the broker, else 0.",
              lambda: int(consumer.broker is not None))
        gauge(PREFIX + "consumer_seconds_since_turn",
              "Seconds since the consumer loop last turned (what /healthz watches).",
              lambda: max(0.0, self.clock() - self.last_turn))

    # -- consumer hooks (consumer thread) ---------------------------------------------

    def turned(self) -> None:
        self.last_turn = self.clock()

    def connected(self, broker: Any) -> None:
        self.connections += 1
        if self.connections > 1:
            self.reconnects_total.inc()

    def ready(self) -> None:
        """The worker is consuming (``worker_ready`` was sent)."""
        self.started = True

    def received(self, request: Any) -> None:
        self.received_total.child(request.message.name).inc()

    def revoked(self, request: Any, *, terminated: bool = False, signum: Any = None,
                expired: Any = False) -> None:
        self.revoked_total.child(request.message.name).inc()

    def finished(self, request: Any, outcome: Outcome, settled: Settle) -> None:
        name = request.message.name
        state = outcome.state
        if state is State.SUCCESS:
            self.succeeded_total.child(name).inc()
        elif state in (State.FAILURE, State.INTERNAL_ERROR):
            if settled is not Settle.REQUEUE:  # a lost task requeued has not failed yet
                self.failed_total.child(name).inc()
        elif state is State.RETRY:
            self.retried_total.child(name).inc()
        elif state is State.REJECTED:
            if not outcome.requeue:
                self.failed_total.child(name).inc()
        elif state is State.IGNORED:
            self.ignored_total.child(name).inc()
        if settled in (Settle.DROP, Settle.REQUEUE):
            self.rejected_total.child(name).inc()
        runtime = outcome.runtime
        if runtime is None and request.time_start is not None:
            runtime = max(0.0, self.wall_clock() - request.time_start)
        if runtime is not None:
            self.runtime.child(name).observe(runtime)

    # -- probes (scraping thread) -------------------------------------------------------

    def liveness(self) -> Probe:
        consumer = self._consumer
        if consumer is None:
            return Probe(True, "starting", "the consumer is not built yet")
        return liveness(
            now=self.clock(), last_turn=self.last_turn, stall_timeout=self.stall_timeout,
            connected=consumer.broker is not None,
            running_inline=bool(consumer.pool.runs_inline and consumer.active),
            stopping=bool(consumer.should_stop))

    def readiness(self) -> Probe:
        consumer = self._consumer
        if consumer is None:
            return Probe(False, "starting", "the consumer is not built yet")
        return readiness(started=self.started, connected=consumer.broker is not None,
                         stopping=bool(consumer.should_stop))

    def render(self) -> str:
        return exposition(self.registry).decode()
