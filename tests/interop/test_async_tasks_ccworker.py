"""``async def`` tasks, ccworker only: what no Celery worker has to compare with.

* the coroutine's ``finally`` runs at the hard limit, on every pool;
* one loop per slot thread (``-P threads``) or per process (``-P asyncio``),
  kept across tasks, its ``on_loop_start`` hook run once; ``-P asyncio``
  running ``-c`` coroutines at once and synchronous tasks off the loop;
* the watchdog naming a coroutine that blocks the loop;
* gevent/eventlet refusing them, and a Celery worker failing one it
  receives (``EncodeError``) and going on.

The differential scenarios are in test_async_tasks.py. None of these depends
on the broker: Redis only.
"""

from __future__ import annotations

import re

import pytest
from test_async_tasks import POOLS, PROJECT
from test_terminate import records

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]


def _ccworker_only(broker, worker_cache, scenario, **flags):
    if "ccworker" not in harness.selected_kinds():
        pytest.skip("ccworker-only scenario; CC_WORKERS excludes ccworker")
    spec = harness.WorkerSpec(project=PROJECT, **flags)
    worker = worker_cache.get_many(["ccworker"], broker, spec)["ccworker"]
    return harness.run_side("ccworker", worker, scenario), worker


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
@pytest.mark.parametrize("pool", POOLS)
def test_hard_limit_cancels_the_coroutine(broker, worker_cache, pool):
    """At the hard limit the coroutine is cancelled where it awaits: its
    ``finally`` runs (on prefork too: the child's SIGTERM is delivered to the
    coroutine before the child leaves), then FAILURE ``TimeLimitExceeded``."""

    def scenario(app, observe):
        result = observe.send("hard_limited")
        observe.get_and_meta(result, "hard")
        observe.record("finally ran", harness.wait_until(lambda: any(
            kind == "hard_limited_finally" and detail.get("id") == result.id
            for kind, detail in records(observe))))

    obs, _ = _ccworker_only(broker, worker_cache, scenario, pool=pool, concurrency=2)
    assert obs["hard.raw"]["result"]["exc_type"] == "TimeLimitExceeded"
    assert obs["finally ran"] is True


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
@pytest.mark.parametrize("pool", POOLS)
def test_a_cancellation_nobody_asked_for_fails_the_task(broker, worker_cache, pool):
    """A coroutine ending in an ``asyncio.CancelledError`` that no limit,
    terminate or shutdown asked for (it awaited a cancelled child) fails its
    task like any exception, with Celery's log line. asyncio's is a
    BaseException, which Celery's trace lets through: before, nothing was
    stored and the client waited for ever."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("cancelled_by_itself"), "cancelled")
        observe.get(observe.send("add", (1, 2)), "after")

    obs, worker = _ccworker_only(broker, worker_cache, scenario, pool=pool, concurrency=2)
    assert obs["cancelled.raw"]["status"] == "FAILURE", worker.log_tail(30)
    assert obs["cancelled.raw"]["result"]["exc_type"] == "CancelledError"
    assert obs["after"]["value"] == 3
    assert re.search(r"Task proj_async\.tasks\.cancelled_by_itself\[[0-9a-f-]+\] "
                     r"raised unexpected: CancelledError", worker.log())


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
@pytest.mark.parametrize("pool", POOLS)
def test_an_async_task_awaits_another_called_directly(broker, worker_cache, pool):
    """Inside a task's coroutine another ``async def`` task called directly
    (``other(x)``, ``other.run(x)``) gives its coroutine to await, as calling
    the ``async def`` function does; called anywhere else it is awaited to
    its end (the worker's own call, ``self.retry``...)."""

    def scenario(app, observe):
        observe.get(observe.send("calls_others", (10,)), "direct calls")

    obs, _ = _ccworker_only(broker, worker_cache, scenario, pool=pool, concurrency=2)
    assert obs["direct calls"]["value"] == [11, 12]


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
@pytest.mark.parametrize("pool, concurrency", [("threads", 2), ("asyncio", 20)])
def test_one_loop_per_slot_thread_or_per_process(broker, worker_cache, pool, concurrency):
    """The loop outlives each task: every run on a threads slot, and every run
    of ``-P asyncio``'s process, sees the same loop, whose start hooks ran
    once; ``-P asyncio`` runs ``-c`` coroutines at once (a barrier of 20 only
    opens if all 20 wait in it together) and synchronous tasks on threads,
    never on the loop."""

    def scenario(app, observe):
        first = observe.send("loop_identity").get(timeout=20)
        seen = [observe.send("loop_identity").get(timeout=20) for _ in range(5)]
        runs = [first, *seen]
        observe.record("same loop", all(entry == first for entry in seen))
        observe.record("loops", len({entry[1] for entry in runs}))
        observe.record("loops begun", sorted({entry[2] for entry in runs}))
        if pool == "asyncio":
            key = f"ccit.barrier.{harness.new_token()}"
            barrier = [observe.send("barrier", (key, concurrency)) for _ in range(concurrency)]
            observe.record("all at once", [r.get(timeout=40) for r in barrier])
            observe.record("sync thread", observe.send("sync_thread").get(timeout=20))

    obs, _ = _ccworker_only(broker, worker_cache, scenario, pool=pool, concurrency=concurrency)
    if pool == "asyncio":
        assert obs["same loop"] is True
        assert obs["loops begun"] == [1]
        assert obs["all at once"] == [True] * concurrency
        assert obs["sync thread"] != "ccworker-asyncio"
    else:
        # Six runs on two slot threads: at most one loop each (the worker is
        # shared within the module: earlier tests may have replaced threads).
        assert obs["loops"] <= concurrency


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_task_blocking_the_loop_is_named(broker, worker_cache):
    """``-P asyncio``: a coroutine that blocks its loop (synchronous sleep) is
    named by the watchdog, as under ``-P gevent``, with how long it lasted."""

    def scenario(app, observe):
        result = observe.send("block_loop", (2,))
        observe.record("result", result.get(timeout=30))
        observe.record("named", harness.wait_until(
            lambda: f"Task proj_async.tasks.block_loop[{result.id}] (at " in observe.worker.log()
            and "has blocked the asyncio event loop for" in observe.worker.log()))
        observe.record("ended", harness.wait_until(lambda: re.search(
            rf"Task proj_async\.tasks\.block_loop\[{result.id}\] \(at [^)]*\) blocked the "
            r"asyncio event loop for \d+\.\d+s", observe.worker.log())) is not None)

    obs, _ = _ccworker_only(broker, worker_cache, scenario, pool="asyncio", concurrency=4)
    assert obs["result"] == "blocked"
    assert obs["named"] and obs["ended"]


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
def test_a_celery_worker_fails_them_and_goes_on(broker, worker_cache):
    """Item 4: a Celery worker that receives an ``async def`` task anyway (a
    queue not routed away from it) stores FAILURE ``EncodeError`` (it cannot
    encode the coroutine it got back), nothing hangs, the next task runs."""
    if "celery" not in harness.selected_kinds():
        pytest.skip("needs celery worker; CC_WORKERS excludes it")
    spec = harness.WorkerSpec(project=PROJECT, pool="prefork", concurrency=1)
    worker = worker_cache.get_many(["celery"], broker, spec)["celery"]

    def scenario(app, observe):
        observe.get_and_meta(observe.send("add", (1, 2)), "async")
        observe.get(observe.send("noop"), "next")

    obs = harness.run_side("celery", worker, scenario)
    assert obs["async.raw"]["status"] == "FAILURE"
    assert obs["async.raw"]["result"]["exc_type"] == "EncodeError"
    assert obs["next"]["value"] == "done"


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
@pytest.mark.parametrize("pool", ["gevent", "eventlet"])
def test_green_pools_fail_them_clearly(broker, worker_cache, pool):
    """One OS thread runs every greenlet, and asyncio allows one running loop
    per thread: the task fails with a message naming the pools that run it,
    and the worker goes on serving synchronous work."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("add", (1, 2)), "async")
        observe.log_problems("log")

    obs, _ = _ccworker_only(broker, worker_cache, scenario, pool=pool, concurrency=4)
    assert obs["async.raw"]["status"] == "FAILURE"
    assert obs["async.raw"]["result"]["exc_type"] == "RuntimeError"
    assert "use -P threads, prefork or solo" in obs["async.raw"]["result"]["exc_message"][0]
