"""``async def`` tasks (issue 17), sent by a real Celery client, as a client sees them.

A Celery worker cannot run an ``async def`` task, so the reference is the
same body as a synchronous task: ``proj_async`` registers each task under
the same name either as the coroutine function (ccworker) or, with
``CC_TEST_SYNC_TWINS=1`` (``celery worker -P prefork``), as its synchronous
twin, which drives the same coroutine without an event loop and waits with
``time.sleep`` (projects/proj_async/twins.py). Prefork because Celery's
time limits and terminate work there only.

* results, failures, ``self.retry()``, ``autoretry_for``, ``bind``,
  ``shared_task``, a custom ``Task`` base, a chain and a chord, with the
  task signals in Celery's order around the body (records), on every pool
  that runs them (threads, prefork, solo);
* soft limits (``SoftTimeLimitExceeded`` raised at the await, failing the
  task or caught by it) and hard limits (the coroutine cancelled, its
  ``finally`` run, FAILURE ``TimeLimitExceeded``);
* ``revoke(terminate=True)`` through test_terminate's scenario (reply,
  REVOKED meta, events from a real ``EventReceiver``, the ``finally``, the
  slots serving again) and ``inspect active`` while tasks await;

``ccworker check`` listing them is in test_check_command.py. What does not
depend on the broker (the loop, cancellation, refusals) runs on Redis only.

The gevent and eventlet pools refuse them with a clear FAILURE (one running
event loop per OS thread), and a Celery worker that receives one stores
FAILURE ``EncodeError`` and goes on: both are checked too.
"""

from __future__ import annotations

import json
import re

import pytest
from celery import chain, chord
from test_terminate import all_slots_serve, ask, cli, normalise_problem, records, terminate_scenario

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

PROJECT = "proj_async"
WORKER_DEFAULTS = {"project": PROJECT, "concurrency": 2, "extra_flags": ("-E",)}
TWINS = {"pool": "prefork", "env": {"CC_TEST_SYNC_TWINS": "1"}}


def as_twins(pool: str) -> dict:
    """ccworker on ``pool`` against the synchronous twins on Celery's prefork."""
    return {"pool": pool, "by_kind": {"celery": TWINS}}


def normalise_traceback(line: str) -> str | None:
    """Log problems without traceback frames (a coroutine's and its twin's differ)."""
    return normalise_problem(re.sub(r"\s+File .*", "", line))


POOLS = ["threads", "prefork", "solo", "asyncio"]


@pytest.mark.parametrize("pool", POOLS)
def test_results_retries_and_signals(broker, run_differential, pool):
    def scenario(app, observe):
        observe.get_and_meta(observe.send("add", (2, 3)), "add")
        observe.get_and_meta(observe.send("fail", ("boom",)), "fail")
        observe.get(observe.send("request_fields"), "request")
        observe.get_and_meta(observe.send("retried", (1,)), "retried-once")
        observe.get_and_meta(observe.send("retried", (5,)), "retried-out")
        observe.get_and_meta(observe.send("autoretried", (1,)), "autoretried-once")
        observe.get_and_meta(observe.send("autoretried", (5,)), "autoretried-out")
        observe.get(observe.send("shared", ("word",)), "shared_task")
        observe.get_and_meta(observe.send("hooked", (1,)), "custom base")
        observe.get_and_meta(observe.send("noop"), "a synchronous task beside them")
        tasks = app.tasks
        queue = observe.worker.queue
        link = chain(tasks["proj_async.tasks.add"].s(1, 2).set(queue=queue),
                     tasks["proj_async.tasks.add"].s(3).set(queue=queue)).apply_async()
        observe.register_id(link.id)
        observe.get(link, "chain")
        gathered = chord([tasks["proj_async.tasks.add"].s(i, i).set(queue=queue)
                          for i in range(3)],
                         tasks["proj_async.tasks.total"].s().set(queue=queue)).apply_async()
        observe.register_id(gathered.id)
        observe.get(gathered, "chord")
        observe.records("records", per_task=True)
        observe.log_problems("log", normalise_traceback)

    celery_obs, cc_obs = run_differential(scenario, broker, **as_twins(pool))
    assert celery_obs["add"]["value"] == 5
    assert celery_obs["retried-once"]["value"] == "ran 2 times"
    assert celery_obs["autoretried-out.raw"]["result"]["exc_type"] == "KeyError"
    assert celery_obs["chord"]["value"] == 6
    assert celery_obs == cc_obs


@pytest.mark.parametrize("pool", POOLS)
def test_time_limits(broker, run_differential, pool):
    """Soft: ``SoftTimeLimitExceeded`` at the await (uncaught: FAILURE; caught:
    the task goes on awaiting), compared in full. Hard: FAILURE
    ``TimeLimitExceeded`` and Celery's log line, then every slot serves.
    What else happens at a hard limit is the pool's, not the task's: Celery's
    prefork parent SIGTERMs then SIGKILLs the child (the twin's ``finally``
    runs or not, by the clock); ccworker cancels the coroutine, whose
    ``finally`` runs (test_hard_limit_cancels_the_coroutine), and on
    prefork the child leaves."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("soft_limited"), "uncaught")
        observe.get_and_meta(observe.send("soft_caught"), "caught")
        observe.get_and_meta(observe.send("add", (1, 1), soft_time_limit=5), "in time")
        observe.records("records", per_task=True)
        observe.log_problems("log", normalise_traceback)
        observe.get_and_meta(observe.send("hard_limited"), "hard")
        observe.record("hard limit logged", harness.wait_until(
            lambda: "Hard time limit (0.5s) exceeded for proj_async.tasks.hard_limited"
            in observe.worker.log()))
        all_slots_serve(observe, "after", slots=1 if pool == "solo" else 2)

    celery_obs, cc_obs = run_differential(scenario, broker, **as_twins(pool))
    assert celery_obs["uncaught.raw"]["result"]["exc_type"] == "SoftTimeLimitExceeded"
    assert celery_obs["caught"]["value"] == "cleaned up after SoftTimeLimitExceeded()"
    assert celery_obs["hard.raw"]["result"]["exc_type"] == "TimeLimitExceeded"
    assert celery_obs["hard limit logged"] is True
    assert celery_obs == cc_obs


@pytest.mark.parametrize("pool", ["threads", "prefork", "asyncio"])
def test_terminate(broker, run_differential, pool):
    """test_terminate's scenario on an ``async def`` task: the coroutine is
    cancelled (its ``finally`` runs), REVOKED ``terminated``, the events and
    the reply as Celery's prefork pool gives them for the twin."""
    celery_obs, cc_obs = run_differential(terminate_scenario(), broker, **as_twins(pool))
    assert celery_obs["state"] == "REVOKED"
    assert celery_obs["all slots serve after"] == [True, True]
    assert [event[0] for event in celery_obs["events"]] == [
        "task-received", "task-started", "task-revoked"]
    assert celery_obs == cc_obs


@pytest.mark.parametrize("pool", ["threads", "asyncio"])
def test_inspect_active_while_tasks_await(broker, run_differential, pool):
    """``inspect active`` lists two awaiting tasks with their names and args."""

    def scenario(app, observe):
        results = [observe.send("sleep", (2,)) for _ in range(2)]
        harness.wait_until(lambda: len(ask(observe, "active")[0] or []) == 2
                           if ask(observe, "active") else False)
        active = ask(observe, "active")[0]
        observe.record("active", sorted(
            [[entry["name"], entry["args"], entry["id"] in {r.id for r in results},
              entry["acknowledged"]] for entry in active]))
        # The real ``celery inspect active`` command line, as an operator runs it.
        shown = cli(observe.worker, "inspect", "active", "--json")
        replies = json.loads(shown.split("\n", 1)[1]) if shown.startswith("exit 0") else {}
        observe.record("celery inspect active", sorted(
            [entry["name"], entry["args"]] for entries in replies.values()
            for entry in entries))
        observe.record("results", [r.get(timeout=30) for r in results])

    celery_obs, cc_obs = run_differential(scenario, broker, **as_twins(pool))
    assert len(celery_obs["active"]) == 2
    assert len(celery_obs["celery inspect active"]) == 2
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# ccworker only
# --------------------------------------------------------------------------


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
