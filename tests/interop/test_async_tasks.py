"""``async def`` tasks (issue 17), sent by a real Celery client, as a client sees them.

A Celery worker cannot run an ``async def`` task, so the reference is the
same body as a synchronous task: ``proj_async`` registers each task under
the same name either as the coroutine function (ccworker) or, with
``CC_TEST_SYNC_TWINS=1`` (``celery worker -P prefork``), as its synchronous
twin, which drives the same coroutine without an event loop and waits with
``time.sleep`` (projects/proj_async/twins.py). Prefork because Celery's
time limits and terminate work there only.

* results, failures, ``self.retry()``, ``autoretry_for``, ``bind``,
  ``shared_task``, a custom ``Task`` base, a chain and a chord, a
  synchronous task beside them, with the task signals in Celery's order
  around the body (records), on every pool that runs them (threads,
  prefork, solo, asyncio; on RabbitMQ, asyncio);
* countdown, ``expires``, ``acks_late`` and a rate limit (the consumer's
  part, before the body);
* soft limits (``SoftTimeLimitExceeded`` raised at the await, failing the
  task or caught by it) and hard limits (FAILURE ``TimeLimitExceeded``);
* ``revoke(terminate=True)`` through test_terminate's scenario (reply,
  REVOKED meta, events from a real ``EventReceiver``, the ``finally``, the
  slots serving again), and ``inspect active`` (the control API and the
  real ``celery inspect active`` command) while tasks await.

What only ccworker does (the loop itself, the coroutine's ``finally`` at
the hard limit, the watchdog, the green pools' refusal, a Celery worker's
``EncodeError``) is in test_async_tasks_ccworker.py; ``ccworker check``
listing them in test_check_command.py.
"""

from __future__ import annotations

import json
import re

import pytest
from celery import chain, chord
from test_terminate import all_slots_serve, ask, cli, normalise_problem, terminate_scenario

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
#: What a pool does with a coroutine does not depend on the broker, so every
#: pool runs on Redis and RabbitMQ gets ``-P asyncio``, the pool with its own
#: consumer hand-off (one loop for all runs). Workers are the cost of this
#: module: two per broker and pool (the twins' Celery worker is shared).
BROKER_POOLS = [("redis", pool) for pool in POOLS] + [("amqp", "asyncio")]
#: For scenarios that are the consumer's or the mailbox's more than the
#: pool's: one pool per broker.
ONE_POOL_PER_BROKER = [("redis", "threads"), ("amqp", "asyncio")]


@pytest.mark.parametrize(("broker", "pool"), BROKER_POOLS, indirect=["broker"])
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
        # The signals of the tasks above, sent one at a time. A chord's header
        # tasks run side by side, which of them starts first is a race in
        # either worker: the canvas part compares results only.
        observe.records("records", per_task=True)
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
        observe.log_problems("log", normalise_traceback)

    celery_obs, cc_obs = run_differential(scenario, broker, **as_twins(pool))
    assert celery_obs["add"]["value"] == 5
    assert celery_obs["retried-once"]["value"] == "ran 2 times"
    assert celery_obs["autoretried-out.raw"]["result"]["exc_type"] == "KeyError"
    assert celery_obs["chord"]["value"] == 6
    assert celery_obs == cc_obs


@pytest.mark.parametrize(("broker", "pool"), ONE_POOL_PER_BROKER, indirect=["broker"])
def test_what_the_consumer_decides(broker, run_differential, pool):
    """What happens before the body runs is the consumer's, whatever the body:
    countdown, ``expires`` (past, and during the countdown: REVOKED, never
    run), ``acks_late``, a rate limit."""

    def scenario(app, observe):
        from datetime import datetime, timedelta, timezone

        past = datetime.now(timezone.utc) - timedelta(minutes=1)
        observe.get_and_meta(observe.send("add", (1, 1), countdown=1), "countdown")
        observe.get_and_meta(observe.send("add", (2, 2), expires=past), "expired")
        observe.get_and_meta(observe.send("add", (3, 3), countdown=1, expires=0.3),
                             "expired during the countdown")
        observe.get_and_meta(observe.send("late_add", (4, 4)), "acks_late")
        rated = [observe.send("rated", (n,)) for n in range(5)]
        observe.record("rate limited", [r.get(timeout=30) for r in rated])
        observe.records("records", per_task=True)
        observe.log_problems("log", normalise_traceback)

    celery_obs, cc_obs = run_differential(scenario, broker, **as_twins(pool))
    assert celery_obs["countdown"]["value"] == 2
    assert celery_obs["expired.raw"]["status"] == "REVOKED"
    assert celery_obs["rate limited"] == [0, 1, 2, 3, 4]
    assert celery_obs == cc_obs


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
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


@pytest.mark.parametrize("broker", ["redis"], indirect=True)
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


@pytest.mark.parametrize(("broker", "pool"), ONE_POOL_PER_BROKER, indirect=["broker"])
def test_inspect_active_while_tasks_await(broker, run_differential, pool):
    """``inspect active`` lists two awaiting tasks with their names and args."""

    def scenario(app, observe):
        gate = f"ccit.gate.{harness.new_token()}"
        results = [observe.send("gated", (gate,)) for _ in range(2)]
        harness.wait_until(lambda: len(ask(observe, "active")[0] or []) == 2
                           if ask(observe, "active") else False)
        active = ask(observe, "active")[0]
        observe.record("active", sorted(
            [[entry["name"], len(entry["args"]), entry["id"] in {r.id for r in results},
              entry["acknowledged"]] for entry in active]))
        # The real ``celery inspect active`` command line, as an operator runs it.
        shown = cli(observe.worker, "inspect", "active", "--json")
        replies = json.loads(shown.split("\n", 1)[1]) if shown.startswith("exit 0") else {}
        observe.record("celery inspect active", sorted(
            [entry["name"], len(entry["args"])] for entries in replies.values()
            for entry in entries))
        observe.results.rpush(gate, "open")
        observe.results.expire(gate, 120)
        observe.record("results", [r.get(timeout=30) for r in results])

    celery_obs, cc_obs = run_differential(scenario, broker, **as_twins(pool))
    assert len(celery_obs["active"]) == 2
    assert len(celery_obs["celery inspect active"]) == 2
    assert celery_obs == cc_obs
