"""The eventlet pool against ``celery worker -P eventlet``, as a client sees it.

* The foundation scenarios (test_foundation_differential.py) on
  ``-P eventlet -c 20``: their test functions are imported, and this
  module's ``WORKER_DEFAULTS`` give both workers the pool.
* Celery's eventlet pool signals (``eventlet_pool_started``, ``_apply``,
  ``_preshutdown``, ``_postshutdown``), in the order a project's receivers
  see them, and ``inspect stats``' pool section.
* Time limits: Celery's eventlet pool ignores them (its tasks run past
  both), ccworker enforces them as on every pool (docs/compat.md): soft
  raises ``SoftTimeLimitExceeded`` in the task, hard fails it with
  ``TimeLimitExceeded``. ccworker only.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import test_operations as operations
from pool_scenarios import FOUNDATION, scenarios_named

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(400)]

WORKER_DEFAULTS = {"pool": "eventlet", "concurrency": 20}

globals().update(scenarios_named(FOUNDATION))

PROJECT = "proj_eventlet"


@contextlib.contextmanager
def ccworker_alone(log_dir) -> Iterator[harness.WorkerProcess]:
    """A ccworker on ``-P eventlet -c 5`` (Redis), stopped warm (exit 0) after."""
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    spec = harness.WorkerSpec(project=PROJECT, pool="eventlet", concurrency=5)
    worker = harness.WorkerProcess("ccworker", spec, broker, log_dir).start()
    try:
        worker.wait_ready()
        yield worker
    finally:
        assert worker.stop() == 0


def test_pool_signals_and_stats(broker, run_differential):
    """What a project's receivers of Celery's eventlet signals see, and ``stats``."""

    def scenario(app, observe):
        observe.record("until ready", [event for event, _ in observe.worker.startup_records])
        observe.get(observe.send("add", (2, 3)), "add")
        observe.records("records until the task", until=lambda entries: any(
            event == "eventlet_pool_apply" for event, _ in entries))
        stats = app.control.inspect(timeout=5).stats() or {}
        pool = next(iter(stats.values()), {}).get("pool", {})
        observe.record("stats.pool", {k: pool.get(k) for k in
                                      ("implementation", "max-concurrency")})

    celery_obs, cc_obs = run_differential(scenario, broker, project=PROJECT)
    assert celery_obs["stats.pool"] == {
        "implementation": "celery.concurrency.eventlet:TaskPool", "max-concurrency": 20}
    assert celery_obs == cc_obs


def test_time_limits_are_enforced(redis_available, interop_log_dir):
    """ccworker only: Celery's eventlet pool lets both limits pass."""
    with ccworker_alone(interop_log_dir) as worker:
        with harness.client_app(PROJECT, worker.env) as app:
            soft = app.send_task(f"{PROJECT}.tasks.nap", args=(5,), queue=worker.queue,
                                 soft_time_limit=0.5)
            hard = app.send_task(f"{PROJECT}.tasks.nap", args=(5,), queue=worker.queue,
                                 time_limit=0.5)
            ping = app.send_task(f"{PROJECT}.tasks.add", args=(1, 1), queue=worker.queue)
            assert ping.get(timeout=30) == 2
            assert soft.get(timeout=30) == "soft limit caught"
            with pytest.raises(Exception) as failed:
                hard.get(timeout=30)
            assert type(failed.value).__name__ == "TimeLimitExceeded"
        log = worker.log()
        assert f"Soft time limit (0.5s) exceeded for {PROJECT}.tasks.nap[{soft.id}]" in log
        assert f"Hard time limit (0.5s) exceeded for {PROJECT}.tasks.nap[{hard.id}]" in log


def test_control_answers_while_tasks_wait(broker, run_differential):
    """Twenty tasks waiting in green threads: ``inspect ping`` and ``active``
    are answered (the hub is free while tasks wait), as by Celery's."""

    def scenario(app, observe):
        naps = [observe.send("nap", (4,)) for _ in range(20)]
        inspect = app.control.inspect(timeout=3, destination=[observe.worker.nodename])
        active: list = []
        for _ in range(40):
            replies = inspect.active() or {}
            active = next(iter(replies.values()), [])
            if len(active) == 20:
                break
        observe.record("active", len(active))
        observe.record("ping", list((inspect.ping() or {}).values()))
        for result in naps:
            observe.get(result, "nap")

    celery_obs, cc_obs = run_differential(scenario, broker, project=PROJECT)
    assert celery_obs["active"] == 20 and celery_obs["ping"] == [{"ok": "pong"}]
    assert celery_obs == cc_obs


def test_watchdog_names_a_task_blocking_the_hub(redis_available, interop_log_dir):
    """ccworker only (Celery's eventlet worker says nothing): a task that
    computes for 1.5 s is named, with how long it blocked the hub."""
    with ccworker_alone(interop_log_dir) as worker:
        with harness.client_app(PROJECT, worker.env) as app:
            result = app.send_task(f"{PROJECT}.tasks.spin", args=(1.5,), queue=worker.queue)
            assert result.get(timeout=30) == "spun"
        name = f"Task {PROJECT}.tasks.spin[{result.id}]"

        def reported() -> list:
            lines = [line.split(f"{name} (at ", 1)[-1].split(") ", 1)[-1]
                     for line in worker.log().splitlines() if f"{name} (at " in line]
            return [line.split(" for ")[0] for line in lines]

        # When it was noticed, and when it ended (with how long it lasted).
        assert harness.wait_until(lambda: len(reported()) == 2, 10) and reported() == [
            "has blocked the eventlet hub", "blocked the eventlet hub"], worker.log_tail()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_warm_shutdown(sig, interop_log_dir, redis_available):
    """SIGTERM / a first SIGINT while a task sleeps 2 s: warm shutdown, the
    green thread finishes and SUCCESS is stored; exit 0 / 1, as Celery's.
    ccworker's handlers run in a green thread of their own, so its
    ``worker_shutting_down`` receivers may do I/O (they record to Redis)."""
    operations.green_warm_shutdown("eventlet", sig, interop_log_dir)


@pytest.mark.parametrize("how", ["SIGINT-twice", "SIGQUIT"])
def test_cold_shutdown(how, interop_log_dir, redis_available):
    """A second SIGINT, or SIGQUIT, while a task sleeps 2 s: cold shutdown,
    exit 1 without waiting for the green thread, its message back in the
    queue (ccworker only: see test_operations.test_cold_shutdown)."""
    operations.test_cold_shutdown(how, "eventlet", interop_log_dir, redis_available)
