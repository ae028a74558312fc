"""Soft shutdown (``worker_soft_shutdown_timeout``, Celery >= 5.5).

A cold shutdown (SIGQUIT, a second SIGINT) is soft first when the setting is
above 0 and a task runs: "Initiating Soft Shutdown, terminating in N
seconds", running tasks get that long, then the cold shutdown proper.

* A task that ends inside the window finishes, SUCCESS stored, exit 1.
  Compared with ``celery worker`` on prefork, where Celery's soft shutdown
  works (on threads and solo its cold path breaks: test_operations.py).
  ccworker is also held to it on threads.
* A task longer than the window is cut off: the cold shutdown's outcome
  (stored RETRY/FAILURE/REVOKED or the message back in the queue), never a
  vanished task, and the worker gone well before the task would have ended.
* Idle: no soft window (no "Initiating" line), as Celery.

Celery sleeps out the whole window even once its tasks are done; ccworker
ends it when nothing runs (docs/compat.md), so exit times are not compared.
"""

from __future__ import annotations

import signal
import time

import pytest
from test_operations import (
    PROJECT,
    after_exit,
    cleanup,
    clients,
    compare,
    kinds_or_skip,
    records,
    redis_broker,
    report,
    send_signal,
    start_all,
    wait_for,
)

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

INITIATING = "Initiating Soft Shutdown, terminating in {} seconds"


def soft_workers(pool: str, timeout: str, interop_log_dir, kinds) -> tuple:
    broker = redis_broker()
    spec = harness.WorkerSpec(project=PROJECT, pool=pool, concurrency=1,
                              extra_flags=("--", f"worker.soft_shutdown_timeout={timeout}"))
    workers = {k: harness.WorkerProcess(k, spec, broker, interop_log_dir) for k in kinds}
    start_all(list(workers.values()))
    return broker, workers


def start_sleeping(workers: dict, seconds: float) -> dict:
    with clients(list(workers.values())) as apps:
        sent = {kind: app.send_task("proj_ops.tasks.sleeper", (seconds,)).id
                for app, kind in zip(apps, workers)}
    for kind, worker in workers.items():
        assert wait_for(lambda w=worker, k=kind: any(
            r[0] == "started" and r[1]["id"] == sent[k] for r in records(w)), 15), \
            (kind, "task never started", worker.log_tail(40))
    return sent


def observe_exit(broker, worker, task_id: str, timeout: str) -> dict:
    obs = after_exit(broker, worker, task_id)
    log = worker.log()
    obs["initiating_line"] = INITIATING.format(float(timeout)) in log
    obs["hint_line"] = "Hitting Ctrl+C again will terminate all running tasks!" in log
    return obs


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_task_that_fits_the_window_finishes(pool, interop_log_dir, redis_available):
    kinds = kinds_or_skip() if pool == "prefork" else ("ccworker",)
    if pool == "threads" and "ccworker" not in kinds_or_skip():
        pytest.skip("ccworker-only case (CC_WORKERS excludes ccworker)")
    broker, workers = soft_workers(pool, "6", interop_log_dir, kinds)
    observed = {}
    try:
        sent = start_sleeping(workers, 2.0)
        for worker in workers.values():
            send_signal(worker, signal.SIGQUIT)
        for kind, worker in workers.items():
            observed[kind] = observe_exit(broker, worker, sent[kind], "6")
    finally:
        cleanup(list(workers.values()))
    reference = observed.get("celery") or observed["ccworker"]
    assert reference["task_state"] == "SUCCESS", report(observed)
    assert reference["task_finished"] and reference["task_runs"] == 1, report(observed)
    assert reference["initiating_line"] and reference["hint_line"], report(observed)
    assert reference["exit"] == (0 if "celery" in observed else 1), report(observed)
    if "celery" in observed and "ccworker" in observed:
        # Celery's cold path exits 0 although it announces exitcode=1
        # (test_operations.test_cold_shutdown); ccworker exits 1 (G8).
        assert observed["ccworker"]["exit"] == 1, report(observed)
        observed["ccworker"]["exit"] = 0
    compare(observed, workers)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_task_longer_than_the_window_is_cut_off(pool, interop_log_dir, redis_available):
    if "ccworker" not in kinds_or_skip():
        pytest.skip("ccworker-only case (CC_WORKERS excludes ccworker)")
    broker, workers = soft_workers(pool, "1", interop_log_dir, ("ccworker",))
    worker = workers["ccworker"]
    try:
        sent = start_sleeping(workers, 20.0)
        send_signal(worker, signal.SIGQUIT)
        started = time.monotonic()
        obs = observe_exit(broker, worker, sent["ccworker"], "1")
        elapsed = time.monotonic() - started
        log = worker.log_tail(30)
    finally:
        cleanup([worker])
    assert obs["exit"] == 1, (obs, log)
    assert obs["initiating_line"], (obs, log)
    assert not obs["task_finished"], (obs, log)
    assert 1.0 <= elapsed < 10, (elapsed, log)
    assert obs["task_state"] in ("RETRY", "FAILURE", "REVOKED") or obs["queue_depth"] == 1, (
        f"the running task vanished: nothing stored, message not requeued: {obs}\n{log}")


def test_idle_worker_has_no_soft_window(interop_log_dir, redis_available):
    broker, workers = soft_workers("prefork", "5", interop_log_dir, kinds_or_skip())
    observed = {}
    try:
        for worker in workers.values():
            send_signal(worker, signal.SIGQUIT)
        for kind, worker in workers.items():
            started = time.monotonic()
            obs = after_exit(broker, worker, "no-task")
            observed[kind] = {"quick": time.monotonic() - started < 5,
                              "initiating": "Initiating Soft Shutdown" in worker.log(),
                              "shutting_down": obs["shutting_down"]}
    finally:
        cleanup(list(workers.values()))
    reference = observed.get("celery") or observed["ccworker"]
    assert reference["quick"] and not reference["initiating"], report(observed)
    compare(observed, workers)
