"""The worker's metrics: what the consumer reports, what a scrape reads.

The consumer calls five hooks on its own thread, at the moments it sends
the matching task events (events/task_events.py): `received`, `finished`,
`revoked`, plus `connected` after every (re)connection and `turned` once
per loop turn. Each hook is a dictionary update under a lock; nothing here
blocks or does I/O. Gauges (reserved, active, scheduled...) are not pushed
at all: they are read from the consumer when Prometheus scrapes.

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

from celerycompat.execution.outcome import Outcome, Settle, State
from celerycompat.observability.health import Probe, liveness, readiness
from celerycompat.observability.metrics import Registry

PREFIX = "ccworker_"


class WorkerMetrics:
    """Metric families of one worker, the consumer hooks, and the probe inputs."""

    def __init__(self, *, info: Mapping[str, str] | None = None,
                 stall_timeout: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self.stall_timeout = float(stall_timeout)
        self.registry = registry = Registry()
        self.last_turn = clock()
        self.connections = 0
        self.started = False
        self._consumer: Any = None
        labels = dict(info or {})
        started_at = wall_clock()
        registry.gauge(PREFIX + "info", "Version and identity of this worker (always 1).",
                       (lambda: {tuple(labels.values()): 1}) if labels else (lambda: 1),
                       labels=tuple(labels))
        registry.gauge(PREFIX + "start_time_seconds",
                       "When this worker started, in seconds since the epoch.",
                       lambda: started_at)
        task = ("task",)
        self.received_total = registry.counter(
            PREFIX + "tasks_received_total", "Tasks received (task-received events).", task)
        self.succeeded_total = registry.counter(
            PREFIX + "tasks_succeeded_total", "Tasks that succeeded.", task)
        self.failed_total = registry.counter(
            PREFIX + "tasks_failed_total",
            "Tasks that failed: an exception, an internal error, a Reject without requeue.",
            task)
        self.retried_total = registry.counter(
            PREFIX + "tasks_retried_total", "Tasks that asked to be retried.", task)
        self.rejected_total = registry.counter(
            PREFIX + "tasks_rejected_total",
            "Task messages rejected or requeued after the run (task-rejected events).", task)
        self.revoked_total = registry.counter(
            PREFIX + "tasks_revoked_total",
            "Tasks discarded as revoked or expired (task-revoked events).", task)
        self.ignored_total = registry.counter(
            PREFIX + "tasks_ignored_total",
            "Tasks that raised Ignore (task.replace() among them).", task)
        self.runtime = registry.histogram(
            PREFIX + "task_runtime_seconds",
            "Task run time: the time Celery logs in 'succeeded in', or from the start "
            "to the outcome for other outcomes.", task)
        self.reconnects_total = registry.counter(
            PREFIX + "broker_reconnects_total",
            "Broker connections re-established after a loss.")

    # -- what the consumer state says, read at scrape time --------------------------

    def watch(self, consumer: Any) -> None:
        """Add the gauges read from ``consumer`` (and its pool) at every scrape."""
        self._consumer = consumer
        gauge = self.registry.gauge
        gauge(PREFIX + "tasks_reserved",
              "Prefetched tasks waiting for a pool slot (inspect reserved).",
              lambda: len(consumer.reserved))
        gauge(PREFIX + "tasks_active", "Tasks running (inspect active).",
              lambda: len(consumer.active))
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

    def connected(self) -> None:
        self.connections += 1
        if self.connections > 1:
            self.reconnects_total.inc()

    def ready(self) -> None:
        """The worker is consuming (``worker_ready`` was sent)."""
        self.started = True

    def received(self, request: Any) -> None:
        self.received_total.inc(request.message.name)

    def revoked(self, request: Any, expired: Any = False) -> None:
        self.revoked_total.inc(request.message.name)

    def finished(self, request: Any, outcome: Outcome, settled: Settle) -> None:
        name = request.message.name
        state = outcome.state
        if state is State.SUCCESS:
            self.succeeded_total.inc(name)
        elif state in (State.FAILURE, State.INTERNAL_ERROR):
            if settled is not Settle.REQUEUE:  # a lost task requeued has not failed yet
                self.failed_total.inc(name)
        elif state is State.RETRY:
            self.retried_total.inc(name)
        elif state is State.REJECTED:
            if not outcome.requeue:
                self.failed_total.inc(name)
        elif state is State.IGNORED:
            self.ignored_total.inc(name)
        if settled in (Settle.DROP, Settle.REQUEUE):
            self.rejected_total.inc(name)
        runtime = outcome.runtime
        if runtime is None and request.time_start is not None:
            runtime = max(0.0, self.wall_clock() - request.time_start)
        if runtime is not None:
            self.runtime.observe(runtime, name)

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
        return self.registry.render()
