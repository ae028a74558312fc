"""The gevent pool against ``celery worker -P gevent``, as a client sees it.

* The foundation scenarios (``test_foundation_differential``) run again here
  on ``-P gevent -c 20``: their test functions are imported, and this
  module's ``WORKER_DEFAULTS`` gives them the pool. The ones that observe
  the order of tasks sent together run on one slot (``*_one_slot``).
  ``test_ignore_result`` is not re-run: it records the consumer's
  ``task_received`` and the task's signals in one list, and under gevent
  the recording's own Redis I/O lets the consumer receive the next task in
  the middle of the first (a race in Celery's gevent pool as in ours).
* 250 tasks waiting on a gate on ``-c 200 -E``: 200 of them (never more)
  run at once, while ``inspect ping``/``active``/``stats`` are answered
  and their ``task-started`` events arrive.
* Hard time limits (task attribute, message option, ``--time-limit``,
  ``control time_limit``) against Celery's gevent pool, which enforces them
  too (with ``gevent.Timeout``).
* Soft time limits: Celery's gevent pool ignores them (wire contract B24;
  Celery docs: "The gevent pool does not implement soft time limits"), so
  the reference is ``celery worker -P prefork``: the same warning line, the
  same ``SoftTimeLimitExceeded`` in the task.
* ccworker only: a task that swallows the hard limit's kill, and the
  watchdog's log lines for a task that blocks the event loop (Celery has no
  such watchdog; its gevent pool just stalls).

Celery's gevent worker on RabbitMQ takes in about one message per 0.1 s
(visible in its log), so scenarios there send few tasks or wait long.
"""

from __future__ import annotations

import functools
import uuid

import pytest

# The foundation scenarios, re-run on gevent (see WORKER_DEFAULTS).
import test_foundation_differential as foundation
import test_operations as operations
from pool_scenarios import FOUNDATION, scenarios_named
from test_events import Listener

from harness import WorkerSpec, run_side, selected_kinds, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(400)]

WORKER_DEFAULTS = {"pool": "gevent", "concurrency": 20}

globals().update(scenarios_named(FOUNDATION))

PROJECT = "proj_gevent"


def test_hook_and_signal_order_one_slot(broker, run_differential):
    foundation.test_hook_and_signal_order(
        broker, functools.partial(run_differential, concurrency=1))


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_rpc_results_one_slot(broker, run_differential):
    foundation.test_rpc_results(broker, functools.partial(run_differential, concurrency=1))


# --------------------------------------------------------------------------
# Shutdown (wire contract G8, G9), as test_operations checks the other pools
# --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_warm_shutdown(sig, interop_log_dir, redis_available):
    """SIGTERM / a first SIGINT while a task sleeps 2 s: warm shutdown, the
    greenlet finishes and SUCCESS is stored; exit 0 / 1, as Celery's.

    **Differs**: ccworker runs its signal handlers in a greenlet, so
    ``worker_shutting_down`` receivers may do I/O (this project's records
    to Redis). Celery's gevent worker runs them in the event loop, where
    that receiver fails with ``BlockingSwitchOutError`` and records nothing.
    """
    shutting_down = operations.green_warm_shutdown("gevent", sig, interop_log_dir)
    if "celery" in shutting_down:
        assert shutting_down["celery"] == []


@pytest.mark.parametrize("how", ["SIGINT-twice", "SIGQUIT"])
def test_cold_shutdown(how, interop_log_dir, redis_available):
    """A second SIGINT, or SIGQUIT, while a task sleeps 2 s: cold shutdown,
    exit 1 without waiting for the greenlet, its message back in the queue
    (ccworker only: see test_operations.test_cold_shutdown for why)."""
    operations.test_cold_shutdown(how, "gevent", interop_log_dir, redis_available)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------




def runs(observe, once: str):
    """How often a ``once=<key>`` task ran (its Redis counter)."""
    value = observe.results.get(f"ccit.once.{once}")
    return None if value is None else int(value)


def serve_check(observe, label: str, n: int = 4) -> None:
    """The worker still serves: ``n`` tasks, all answered."""
    results = [observe.send("add", (i, i)) for i in range(n)]
    observe.record(label, [r.get(timeout=30, propagate=False) for r in results])


def inspect(app, observe, timeout: float = 10.0):
    """An ``inspect`` for this worker only, returning at its first reply."""
    return app.control.inspect(destination=[observe.worker.nodename], timeout=timeout,
                               limit=1)


# --------------------------------------------------------------------------
# Many greenlets
# --------------------------------------------------------------------------


def without_hub_watchdog(line: str):
    """Drop the hub watchdog's lines: on a CPU-starved machine (a loaded CI
    runner; two workers with 200 greenlets each on 2 cores) the loop really
    does not turn for a second, and the watchdog names whatever greenlet was
    current, task or not. Celery has no such diagnostic to compare with; the
    watchdog has a test of its own (test_blocking_the_hub_is_logged)."""
    return None if "blocked the gevent event loop" in line else line


def test_many_greenlets(broker, run_differential):
    """250 tasks that wait on a gate on ``-c 200 -E``: 200 of them (all the
    slots, never more) run at once, and meanwhile ``inspect ping``,
    ``active`` and ``stats`` are answered and every started task's
    ``task-started`` event has arrived; opened, every task succeeds (each
    with received/started/succeeded events) and the reserved 50 run too."""
    gate = f"ccit.gate.{uuid.uuid4().hex}"

    def scenario(app, observe):
        node = observe.worker.nodename
        listener = Listener(app, node).start()
        try:
            sent = [observe.send("gated", (gate,)) for _ in range(250)]
            ids = [r.id for r in sent]

            def active():
                reply = inspect(app, observe).active() or {}
                return reply.get(node, [])

            running = wait_until(lambda: len(active()) >= 200, timeout=90, interval=0.3)
            # All slots busy, nothing can finish: remote control and events
            # must not be waiting for a task.
            running = active()
            observe.record("active.count", len(running))
            observe.record("active.fields", sorted({
                (entry["name"], entry["acknowledged"], type(entry["worker_pid"]).__name__)
                for entry in running}))
            observe.record("ping", app.control.ping([node], timeout=10))
            stats = (inspect(app, observe).stats() or {}).get(node, {})
            observe.record("stats.pool", stats.get("pool"))

            def started():
                return {e.get("uuid") for e in list(listener.events)
                        if e["type"] == "task-started"} & set(ids)

            listener.wait_for(lambda events: len(started()) >= 200, timeout=30)
            observe.record("started-events", len(started()))
            observe.results.set(gate, 1)
            observe.record("results", [r.get(timeout=90, propagate=False) for r in sent])
            listener.wait_for(lambda events: sum(
                e["type"] == "task-succeeded" and e.get("uuid") in ids
                for e in list(events)) >= 250, timeout=30)
        finally:
            listener.stop()
            observe.results.delete(gate)
        observe.record("events", sorted({
            tuple(e["type"] for e in listener.events if e.get("uuid") == tid)
            for tid in ids}))
        observe.queue_depth("queue")
        observe.log_problems("log", without_hub_watchdog)

    celery_obs, cc_obs = run_differential(scenario, broker, project=PROJECT,
                                          concurrency=200, extra_flags=("-E",))
    assert celery_obs["active.count"] == 200
    assert celery_obs["active.fields"] == [[f"{PROJECT}.tasks.gated", True, "int"]]
    assert celery_obs["ping"] == [{"<nodename>": {"ok": "pong"}}]
    assert celery_obs["stats.pool"] == {
        "implementation": "celery.concurrency.gevent:TaskPool", "max-concurrency": 200}
    assert celery_obs["started-events"] == 200
    assert celery_obs["results"] == ["opened"] * 250
    assert celery_obs["events"] == [["task-received", "task-started", "task-succeeded"]]
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# Time limits
# --------------------------------------------------------------------------


def test_hard_time_limit(broker, run_differential):
    """Task ``time_limit`` and the ``time_limit`` call option: the greenlet is
    interrupted, FAILURE ``TimeLimitExceeded(<limit>)`` (no traceback),
    ``task_postrun`` then ``on_failure``, ``after_return``, ``task_failure``,
    Celery's log line; ``acks_late`` + ``acks_on_failure_or_timeout=False``:
    FAILURE stored and the message requeued (it then runs again)."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("hard_limited"), "task-attr")
        observe.get_and_meta(observe.send("limited_by_message", time_limit=1.5),
                             "call-option")
        observe.get_and_meta(observe.send("limited_by_message", (0.1,), time_limit=1.5),
                             "in-time")
        once = observe.new_id()
        late = observe.send("hard_limited_late", (once,))
        wait_until(lambda: (observe.meta_raw(late.id)[0] or b"").startswith(
            b'{"status": "SUCCESS"'), timeout=40)
        observe.get_and_meta(late, "late-requeued")
        observe.record("late.runs", runs(observe, once))
        observe.results.delete(f"ccit.once.{once}")
        serve_check(observe, "after")
        observe.records("records", per_task=True)
        observe.log_problems("log")

    celery_obs, cc_obs = run_differential(scenario, broker, project=PROJECT)
    assert celery_obs["task-attr.raw"]["result"] == {
        "exc_type": "TimeLimitExceeded", "exc_message": [1],
        "exc_module": "billiard.exceptions"}
    assert celery_obs["task-attr.raw"]["traceback"] is None
    assert celery_obs["call-option.raw"]["result"]["exc_message"] == [1.5]
    assert celery_obs["in-time"]["value"] == "finished"
    assert celery_obs["late-requeued"]["value"] == "second run"
    assert celery_obs["late.runs"] == 2
    assert celery_obs == cc_obs


def test_worker_time_limit_flag(broker, run_differential):
    """``--time-limit`` applies to tasks without their own limit."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("sleep", (10,)), "hard")
        observe.get_and_meta(observe.send("sleep", (0.1,)), "in-time")
        serve_check(observe, "after")
        observe.log_problems("log")

    celery_obs, cc_obs = run_differential(
        scenario, broker, project=PROJECT, extra_flags=("--time-limit", "1.5"))
    assert celery_obs["hard.raw"]["result"]["exc_message"] == [1.5]
    assert celery_obs["in-time"]["value"] == 0.1
    assert celery_obs == cc_obs


def test_control_time_limit(broker, run_differential):
    """``celery control time_limit``: the reply, the limit applies to the next
    task of that type, and set back to none it runs unlimited again.

    **Differs** (docs/compat.md, as on the other pools): Celery 5.7 copies a
    task type's limits into its request class when its consumer starts
    (``create_request_cls``), so the command changes nothing there until the
    consumer restarts; its task runs unlimited. The replies and the run
    after the reset are compared; the limited run is asserted per side.
    """
    limited: dict = {}

    def scenario(app, observe):
        name = observe.task_name("limited_by_message")
        node = [observe.worker.nodename]
        observe.record("set", app.control.time_limit(name, hard=1, destination=node,
                                                     reply=True, timeout=5))
        try:
            result = observe.send("limited_by_message", (3,))
            value = result.get(timeout=30, propagate=False)
            limited[observe.worker.kind] = (result.state, repr(value))
        finally:
            observe.record("reset", app.control.time_limit(
                name, hard=None, soft=None, destination=node, reply=True, timeout=5))
        observe.get_and_meta(observe.send("limited_by_message", (1.2,)), "unlimited")

    celery_obs, cc_obs = run_differential(scenario, broker, project=PROJECT)
    assert celery_obs["set"] == [{"<nodename>": {"ok": "time limits set successfully"}}]
    assert celery_obs["unlimited"]["value"] == "finished"
    assert celery_obs == cc_obs
    assert limited.get("ccworker") == ("FAILURE", "TimeLimitExceeded(1)")
    if "celery" in limited:
        assert limited["celery"] == ("SUCCESS", "'finished'")


def test_soft_time_limit_against_prefork(broker, run_differential):
    """Soft limits (task attribute, call option, ``--soft-time-limit``): the
    warning line, then ``SoftTimeLimitExceeded`` raised in the task, which
    fails or catches it; compared with ``celery worker -P prefork`` since
    Celery's gevent pool never fires them."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("soft_limited"), "uncaught")
        observe.get_and_meta(observe.send("soft_caught"), "caught")
        observe.get_and_meta(observe.send("limited_by_message", (5,), soft_time_limit=0.5),
                             "call-option")
        observe.get_and_meta(observe.send("sleep", (5,)), "worker-flag")
        serve_check(observe, "after")
        # Celery stores a task's result before its task_failure/task_postrun
        # signals, so the client's next task can start in another slot first.
        observe.records("records", per_task=True)
        observe.log_problems("log")

    celery_obs, cc_obs = run_differential(
        scenario, broker, project=PROJECT, concurrency=4,
        extra_flags=("--soft-time-limit", "1.5"), by_kind={"celery": {"pool": "prefork"}})
    assert celery_obs["uncaught.raw"]["result"]["exc_type"] == "SoftTimeLimitExceeded"
    assert celery_obs["caught"]["value"] == "cleaned up after SoftTimeLimitExceeded()"
    assert celery_obs["call-option.raw"]["result"]["exc_type"] == "SoftTimeLimitExceeded"
    assert celery_obs["worker-flag.raw"]["result"]["exc_type"] == "SoftTimeLimitExceeded"
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# ccworker only
# --------------------------------------------------------------------------


def _ccworker_only(broker, worker_cache, scenario, **flags):
    if "ccworker" not in selected_kinds():
        pytest.skip("ccworker-only scenario; CC_WORKERS excludes ccworker")
    spec = WorkerSpec(project=PROJECT, pool="gevent", **flags)
    worker = worker_cache.get_many(["ccworker"], broker, spec)["ccworker"]
    return run_side("ccworker", worker, scenario), worker


def test_swallowed_kill(broker, worker_cache):
    """A task that catches the hard limit's kill and carries on: FAILURE
    ``TimeLimitExceeded`` is stored on time and stays (the task's own
    result is never written), a warning says it goes on outside the pool,
    and every slot keeps serving."""

    def scenario(app, observe):
        result = observe.send("swallow_kill", (3,))
        observe.get_and_meta(result, "limited")
        wait_until(lambda: any(b"swallow_kill_finished" in raw for raw in
                               observe.results.lrange(observe.worker.record_key, 0, -1)))
        observe.meta(result.id, "after-task-ended")
        serve_check(observe, "after", n=2)
        observe.log_problems("log")

    obs, _ = _ccworker_only(broker, worker_cache, scenario, concurrency=2)
    assert obs["limited"]["state"] == "FAILURE"
    assert obs["limited.raw"]["result"]["exc_type"] == "TimeLimitExceeded"
    assert obs["after-task-ended.raw"] == obs["limited.raw"]
    assert obs["after"] == [0, 2]
    assert any("did not stop when killed at its hard time limit" in line
               for line in obs["log"])
    assert obs["worker_alive"] is True


@pytest.mark.parametrize("task", ["spin", "block"])
def test_blocking_the_hub_is_logged(broker, worker_cache, task):
    """A task that computes (``spin``) or makes a call gevent does not patch
    (``block``) for 2.5 s: the watchdog names it and the code line while it
    blocks, then says how long it blocked; the worker then serves again."""

    def scenario(app, observe):
        result = observe.send(task, (2.5,))
        observe.get(result, "blocked", timeout=30)
        observe.record("ping", app.control.ping([observe.worker.nodename], timeout=10))
        # The watchdog thread says the block ended at its next look (a
        # fraction of a second after the loop turns again).
        wait_until(lambda: len([
            line for line in observe.worker.log().splitlines()
            if f"[{result.id}] (at " in line and "blocked the gevent event loop for" in line
        ]) >= 2)
        observe.log_problems("log")

    obs, worker = _ccworker_only(broker, worker_cache, scenario)
    assert obs["blocked"]["state"] == "SUCCESS"
    log = obs["log"]
    name = f"Task {PROJECT}.tasks.{task}[<task-1>] (at "
    started = [line for line in log if name in line and "has blocked the gevent event loop "
               "for " in line]
    ended = [line for line in log if name in line and "blocked the gevent event loop for "
             in line and "has blocked" not in line]
    assert len(started) == 1 and len(ended) == 1, log
    assert "proj_gevent/tasks.py:" in started[0] and f" in {task})" in started[0]
    assert started[0].startswith("WARNING ")
    seconds = float(ended[0].rsplit(" for ", 1)[1].rstrip("s"))
    assert seconds >= 2.0
    assert obs["ping"] == [{"<nodename>": {"ok": "pong"}}]
