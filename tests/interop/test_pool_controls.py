"""Pool controls, differential: ``pool_grow``, ``pool_shrink``, ``autoscale``,
``pool_restart`` and ``--autoscale``.

An operator resizes a running worker with the real ``celery control`` CLI
and ``app.control``; the tests compare, against ``celery worker``, the
replies (errors included), the ``pool`` (and ``autoscaler``) section of
``inspect stats`` and the prefetch count after each step, and whether the
worker really runs as many tasks at once as it says (``barrier`` tasks that
succeed only if ``n`` of them run at the same time).

* prefork and gevent: as Celery's, except that gevent never shrinks below
  no slot (Celery's goes negative: ``max-concurrency: -6``).
* threads: Celery's threads pool cannot resize (an AttributeError reply;
  its ``--autoscale`` crashes the worker when it scales). ccworker's
  resizes as Celery's gevent pool does: compared with ``celery worker -P
  gevent``, on the slot count.
* solo: cannot resize, with Celery's replies.
* ``--autoscale=4,1`` (``AUTOSCALE_KEEPALIVE=2``): starts with one process
  and a prefetch count for four, grows to four under load, shrinks back to
  one when idle; ``autoscale`` moves the bounds; ``pool_grow``/``pool_shrink``
  are refused. Timing is coarse (polls, never "within N seconds").
* ``pool_restart`` (``worker_pool_restarts``): modules are (re)imported and
  prefork children replaced, so a task sees the new code.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(400)]

PROJECT = "proj_pool"
#: Every scenario resizes or restarts its worker: none reuses another's.
WORKER_DEFAULTS = {"project": PROJECT, "concurrency": 2, "fresh": True}


def cli(worker: harness.WorkerProcess, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", PROJECT, *args, "-d", worker.nodename],
        cwd=str(harness.PROJECTS_DIR), env=worker.process_env(), capture_output=True,
        text=True, timeout=60)
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def ask(observe, method: str, **arguments) -> list:
    node = observe.worker.nodename
    replies = observe.app.control.broadcast(method, arguments=arguments, destination=[node],
                                            reply=True, timeout=3.0)
    return [reply[node] for reply in replies if node in reply]


def stats(observe) -> dict:
    replies = ask(observe, "stats")
    return replies[0] if replies else {}


def pool_view(pool: dict, keys=None) -> dict:
    """The pool section without what differs between two runs by nature: pids
    (their count is kept) and ``writes`` (the spread of tasks over processes,
    and processes counted once they say they are up: timing)."""
    view = {}
    for key, value in pool.items():
        if keys is not None and key not in keys:
            continue
        if key == "processes":
            value = len(value)
        elif key == "writes" and isinstance(value, dict):
            value = sorted(value)
        view[key] = value
    return view


wait_until = functools.partial(harness.wait_until, timeout=30.0, interval=0.2)


def slots(observe) -> int | None:
    """How many slots the pool has now: processes (prefork), else max-concurrency."""
    pool = stats(observe).get("pool", {})
    if "processes" in pool and pool.get("implementation", "").endswith("prefork:TaskPool"):
        return len(pool["processes"])
    return pool.get("max-concurrency")


def record_stats(observe, label: str, keys=None, prefetch: bool = True) -> None:
    """``pool`` (and ``autoscaler``) and ``prefetch_count`` of ``inspect stats``.

    ``prefetch=False`` after a shrink that failed or left no process: from
    then on Celery's prefetch count no longer follows its pool (it adds each
    later change to a count that missed one), ccworker's is always slots x
    multiplier (docs/compat.md); `test_prefetch_follows_the_pool` checks ours.
    """
    info = stats(observe)
    autoscaler = info.get("autoscaler")
    if autoscaler is not None:
        # ``qty`` counts requests until the worker has settled them, which may
        # be after the client got its result: only its presence is compared.
        autoscaler = {**autoscaler, "qty": type(autoscaler.get("qty")).__name__}
    observe.record(label, {
        "keys": list(info),
        "pool": pool_view(info.get("pool", {}), keys),
        "autoscaler": autoscaler,
        "prefetch_count": info.get("prefetch_count") if prefetch else "(not compared)",
    })


def settle_slots(observe, label: str, wanted: int, keys=None, prefetch: bool = True) -> None:
    """Wait until the pool has ``wanted`` slots (a prefork pool forks or reaps
    its processes asynchronously), then record the stats."""
    observe.record(label + ": reached", wait_until(lambda: slots(observe) == wanted) or False)
    record_stats(observe, label, keys, prefetch)


def concurrent(observe, label: str, n: int) -> None:
    """``n`` tasks that each succeed only if all ``n`` run at the same time."""
    key = f"ccit.barrier.{uuid.uuid4().hex}"
    results = [observe.send("barrier", (key, n)) for _ in range(n)]
    observe.record(label, [r.get(timeout=60, propagate=False) for r in results])


def resize_scenario(keys=None, can_shrink_busy: bool = True):
    """grow 2 / shrink 1 / shrink past the end / grow again, with the checks in between."""

    def scenario(app, observe):
        record_stats(observe, "stats at start", keys)
        observe.record("cli pool_grow 2", cli(observe.worker, "control", "pool_grow", "2"))
        settle_slots(observe, "after grow", 4, keys)
        concurrent(observe, "4 at once", 4)
        observe.record("app.control pool_shrink", app.control.pool_shrink(
            n=1, reply=True, timeout=3.0, destination=[observe.worker.nodename]))
        settle_slots(observe, "after shrink", 3, keys)
        concurrent(observe, "3 at once", 3)
        if can_shrink_busy:
            # Every process idle as the worker sees it (a result a client has
            # read may not have been reported by its process yet).
            observe.record("idle", wait_until(lambda: ask(observe, "active") == [[]]) or False)
            observe.record("shrink past the end", ask(observe, "pool_shrink", n=9))
            settle_slots(observe, "after shrink past the end", 0, keys, prefetch=False)
            observe.record("grow again", ask(observe, "pool_grow", n=2))
        else:
            observe.record("shrink to 1", ask(observe, "pool_shrink", n=2))
            observe.record("grow again", ask(observe, "pool_grow", n=1))
        settle_slots(observe, "after growing again", 2, keys, prefetch=not can_shrink_busy)
        concurrent(observe, "2 at once", 2)
        observe.record("autoscale (not enabled)", ask(observe, "autoscale", max=3, min=1))
        observe.record("pool_restart (not enabled)", ask(observe, "pool_restart"))
        observe.log_problems("log problems")

    return scenario


def test_pool_grow_and_shrink_on_prefork(broker, run_differential):
    celery_obs, cc_obs = run_differential(resize_scenario(), broker, pool="prefork")
    assert celery_obs["4 at once"] == [True] * 4 and celery_obs["2 at once"] == [True] * 2
    assert celery_obs["after grow"]["pool"]["processes"] == 4
    assert celery_obs["shrink past the end"] == [
        {"error": "ValueError(\"Can't shrink pool. All processes busy!\")"}]
    assert celery_obs == cc_obs


def test_pool_grow_and_shrink_on_gevent(broker, run_differential):
    """As Celery's gevent pool (not shrunk below zero, where Celery's goes negative)."""
    celery_obs, cc_obs = run_differential(resize_scenario(can_shrink_busy=False), broker,
                                          pool="gevent")
    assert celery_obs["after grow"]["pool"]["max-concurrency"] == 4
    assert celery_obs["4 at once"] == [True] * 4
    assert celery_obs == cc_obs


def test_pool_grow_and_shrink_on_threads_as_celery_gevent(broker, run_differential):
    """Celery's threads pool cannot resize; ccworker's resizes as Celery's gevent pool."""
    celery_obs, cc_obs = run_differential(
        resize_scenario(keys=("max-concurrency",), can_shrink_busy=False), broker,
        pool="threads", by_kind={"celery": {"pool": "gevent"}})
    assert celery_obs["3 at once"] == [True] * 3
    assert celery_obs == cc_obs


def test_solo_cannot_resize(broker, run_differential):
    def scenario(app, observe):
        for method in ("pool_grow", "pool_shrink"):
            observe.record(method, ask(observe, method, n=1))
        observe.record("cli pool_grow", cli(observe.worker, "control", "pool_grow", "1"))
        observe.record("autoscale", ask(observe, "autoscale", max=3, min=1))
        record_stats(observe, "stats")

    celery_obs, cc_obs = run_differential(scenario, broker, pool="solo", concurrency=1)
    assert celery_obs["pool_grow"] == [
        {"error": "AttributeError(\"'TaskPool' object has no attribute 'grow'\")"}]
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# --autoscale
# --------------------------------------------------------------------------

AUTOSCALE = {"extra_flags": ("--autoscale=4,1",), "env": {"AUTOSCALE_KEEPALIVE": "2"}}


def autoscale_scenario(keys=None):
    def scenario(app, observe):
        record_stats(observe, "at start", keys)
        observe.record("pool_grow refused", ask(observe, "pool_grow", n=1))
        observe.record("pool_shrink refused", ask(observe, "pool_shrink", n=1))
        concurrent(observe, "4 at once under load", 4)
        observe.record("scaled down to 1 when idle",
                       wait_until(lambda: slots(observe) == 1, timeout=60) or False)
        record_stats(observe, "idle", keys)
        observe.record("cli autoscale 3 2", cli(observe.worker, "control", "autoscale", "3", "2"))
        settle_slots(observe, "after autoscale 3 2", 2, keys)
        concurrent(observe, "3 at once", 3)
        observe.record("back to min when idle",
                       wait_until(lambda: slots(observe) == 2, timeout=60) or False)
        observe.record("autoscale max only", ask(observe, "autoscale", max=2))
        record_stats(observe, "after autoscale max only", keys)
        log = observe.worker.log()
        observe.record("logged scaling", ["Scaling up" in log, "Scaling down" in log])
        observe.log_problems("log problems")

    return scenario


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_autoscale(broker, run_differential, pool):
    celery_obs, cc_obs = run_differential(autoscale_scenario(), broker, pool=pool, **AUTOSCALE)
    assert celery_obs["4 at once under load"] == [True] * 4
    assert celery_obs["scaled down to 1 when idle"] is True
    assert celery_obs["at start"]["autoscaler"] == {"max": 4, "min": 1, "current": 1,
                                                    "qty": "int"}
    assert celery_obs["at start"]["prefetch_count"] == 16
    assert celery_obs == cc_obs


def test_autoscale_on_threads_as_celery_gevent(redis_available, run_differential):
    """Celery's threads pool cannot grow (its autoscaler crashes the worker);
    ccworker's autoscales as Celery's gevent pool does."""
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    celery_obs, cc_obs = run_differential(
        autoscale_scenario(keys=("max-concurrency",)), broker, pool="threads",
        by_kind={"celery": {"pool": "gevent"}}, **AUTOSCALE)
    assert celery_obs["4 at once under load"] == [True] * 4
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# pool_restart
# --------------------------------------------------------------------------

#: One module for both sides (the spec, env included, must be the same):
#: each scenario writes it afresh before using it.
RELOAD_DIR = Path(tempfile.mkdtemp(prefix="ccit-reload-"))
RELOAD_MODULE = f"ccit_reload_{uuid.uuid4().hex[:8]}"
#: One process: the second task must run where the first imported the module.
RESTARTS = {"concurrency": 1,
            "env": {"CC_TEST_POOL_RESTARTS": "1", "PYTHONPATH": str(RELOAD_DIR)}}


def write_module(value: int) -> None:
    path = RELOAD_DIR / f"{RELOAD_MODULE}.py"
    path.write_text(f"VALUE = {value}\n")


def restart_scenario(app, observe):
    write_module(1)
    value = observe.send("module_value", (RELOAD_MODULE,))
    observe.record("first import", value.get(timeout=20))
    write_module(2)
    again = observe.send("module_value", (RELOAD_MODULE,))
    observe.record("imported already", again.get(timeout=20))
    processes = stats(observe).get("pool", {}).get("processes")
    before = set(processes or ())
    observe.record("pool_restart", app.control.pool_restart(
        modules=[RELOAD_MODULE], reload=True, reply=True, timeout=3.0,
        destination=[observe.worker.nodename]))

    def new_code():
        return observe.send("module_value", (RELOAD_MODULE,)).get(timeout=20) == 2

    observe.record("tasks see the new code", wait_until(new_code, timeout=40, interval=0.5))

    def replaced():
        after = stats(observe).get("pool", {}).get("processes", [])
        return len(after) == len(before) and not (before & set(after))

    if processes is not None:  # prefork: every child replaced by a fork of the new code
        observe.record("processes replaced", wait_until(replaced, timeout=40) or False)
    observe.log_problems("log problems")


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_pool_restart(broker, run_differential, pool):
    celery_obs, cc_obs = run_differential(restart_scenario, broker, pool=pool, **RESTARTS)
    assert celery_obs["first import"] == 1 and celery_obs["imported already"] == 1
    assert celery_obs["tasks see the new code"] is True
    assert celery_obs["pool_restart"] == [{"<nodename>": {"ok": "reload started"}}]
    assert celery_obs == cc_obs
