"""Soft and hard time limits on every pool, against ``celery worker -P prefork``.

Celery enforces time limits on its prefork pool only (Celery issues #1958,
#9203): under ``celery worker -P threads`` or ``-P solo`` a task runs past
its limits. ccworker enforces them on every pool, the way Celery's prefork
pool does. So the reference here is always ``celery worker -P prefork``
with the same concurrency (``run_differential``'s ``by_kind``), and ccworker
runs on each pool in turn:

* ``solo`` (``-c 1``, compared with prefork ``-c 1``): SIGALRM;
* ``threads`` (``-c 2``): one watchdog thread, exceptions raised inside the
  task's thread, a new thread for a slot whose run hit its hard limit;
* ``prefork`` (``-c 2``): the plain differential.

What a client sees must be the same: stored meta (raw bytes, traceback to
its last line), ``get()``, the hooks and signals the project records, the
WARNING+ log lines, a requeued ``acks_late`` message, and that afterwards
the worker serves with all its slots at once (``meet``: ``n`` tasks that
return True only if all ``n`` run at the same time). Celery's prefork pool
runs the failure path of a hard limit twice (B23 FLAG); ccworker once on
every pool, so records are compared de-duplicated (as in test_prefork.py).

Things that differ by pool, by nature, are asserted on the ccworker side
only and not compared: the threads pool's abandoned thread keeps sleeping
in ``time.sleep`` after its hard limit (the FAILURE is stored on time and
what the thread does when it wakes up is discarded).
"""

from __future__ import annotations

import functools
import re

import pytest

import harness
from harness import Lines, selected_kinds

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

PROJECT = "proj_timelimits"

#: ccworker pool -> concurrency; ``celery worker`` runs prefork with the same.
POOLS = {"solo": 1, "threads": 2, "prefork": 2}


def differential(run_differential, scenario, broker, pool, **flags):
    return run_differential(scenario, broker, project=PROJECT, pool=pool,
                            concurrency=POOLS[pool], by_kind={"celery": {"pool": "prefork"}},
                            **flags)


wait_until = functools.partial(harness.wait_until, timeout=30.0)


def normalise_log(line: str):
    """Drop billiard's "Process ... exited with" line: only prefork has
    processes that exit (and their exit status differs by design, see
    test_prefork.py)."""
    if "' pid:" in line and " exited with " in line:
        return None
    return re.sub(r"ForkPoolWorker-\d+", "ForkPoolWorker-<n>", line)


def dedupe_keep_last(entries: list) -> list:
    """Each distinct record at its last position (Celery's prefork runs the
    hard limit's failure path twice, B23 FLAG)."""
    return [e for i, e in enumerate(entries) if e not in entries[i + 1:]]


def records(observe, label: str, until=None) -> list:
    entries = observe.records(label, until=until, timeout=10)
    observe.observations.pop()
    observe.record(label, Lines(dedupe_keep_last(entries)))
    return entries


def all_slots_serve(observe, label: str) -> None:
    """Every slot takes a task at once: ``n`` meet tasks all see each other.
    (Their own generous limits keep a worker's ``--time-limit`` off them:
    Celery's prefork pool may take seconds to replace a killed child.)"""
    n = observe.worker.spec.concurrency
    key = f"ccit.meet.{observe.new_id()}"
    results = [observe.send("meet", (key, n), soft_time_limit=100, time_limit=120)
               for _ in range(n)]
    observe.record(label, [r.get(timeout=60, propagate=False) for r in results])
    observe.results.delete(key)


def unwound(observe, task_id: str) -> bool:
    return bool(observe.results.exists(f"ccit.unwound.{task_id}"))


def runs(observe, once: str):
    value = observe.results.get(f"ccit.once.{once}")
    return None if value is None else int(value)


def returned(n: int):
    """``records``' until: ``after_return`` ran ``n`` times (it runs after the
    result is stored, so a client can see the result before it)."""
    return lambda entries: sum(e[0] == "after_return" for e in entries) >= n


# --------------------------------------------------------------------------
# Hard limits
# --------------------------------------------------------------------------


@pytest.mark.parametrize("pool", list(POOLS))
def test_hard_time_limit(broker, run_differential, pool):
    """Task ``time_limit``, the ``time_limit`` call option, a task blocked in
    ``time.sleep``, ``acks_late`` + ``acks_on_failure_or_timeout=False``
    (FAILURE stored, message requeued, second run succeeds): FAILURE
    ``TimeLimitExceeded(<limit>)`` without traceback, ``on_failure``,
    ``after_return``, ``task_failure``, Celery's log lines; then every slot
    serves again, and nothing the abandoned task does later is stored."""
    unwinding: dict = {}

    def scenario(app, observe):
        observe.get_and_meta(observe.send("hard_limited"), "task-attr")
        observe.get_and_meta(observe.send("limited_by_message", time_limit=1.5),
                             "call-option")
        observe.get_and_meta(observe.send("limited_by_message", (0.1,), time_limit=1.5),
                             "in-time")
        blocked = observe.send("blocking", (4,), time_limit=1)
        observe.get_and_meta(blocked, "blocked")
        # Right away: on threads the blocked thread still sleeps, yet every
        # slot serves (its slot has a new thread).
        all_slots_serve(observe, "slots")
        if observe.worker.spec.pool != "prefork":
            # The old run is unwound (threads: when its sleep ends); what it
            # does then must not replace the stored FAILURE.
            unwinding[observe.worker.kind] = wait_until(lambda: unwound(observe, blocked.id))
        observe.meta(blocked.id, "blocked-later")

        once = observe.new_id()
        late = observe.send("hard_limited_late", (once,))
        wait_until(lambda: (observe.meta_raw(late.id)[0] or b"").startswith(
            b'{"status": "SUCCESS"'))
        observe.get_and_meta(late, "late-requeued")
        observe.record("late.runs", runs(observe, once))
        observe.results.delete(f"ccit.once.{once}")
        records(observe, "records", until=returned(6))
        observe.log_problems("log", normalise_log)

    celery_obs, cc_obs = differential(run_differential, scenario, broker, pool)
    assert celery_obs["task-attr.raw"]["result"] == {
        "exc_type": "TimeLimitExceeded", "exc_message": [1],
        "exc_module": "billiard.exceptions"}
    assert celery_obs["task-attr.raw"]["traceback"] is None
    assert celery_obs["call-option.raw"]["result"]["exc_message"] == [1.5]
    assert celery_obs["in-time"]["value"] == "finished"
    assert celery_obs["blocked"]["state"] == "FAILURE"
    assert celery_obs["slots"] == [True] * POOLS[pool]
    assert celery_obs["late-requeued"]["value"] == "second run"
    assert celery_obs["late.runs"] == 2
    if pool != "prefork" and "ccworker" in selected_kinds():
        assert unwinding.get("ccworker") is True, "the abandoned run was never unwound"
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# Soft limits
# --------------------------------------------------------------------------


@pytest.mark.parametrize("pool", list(POOLS))
def test_soft_time_limit(broker, run_differential, pool):
    """``soft_time_limit``: the warning line, ``SoftTimeLimitExceeded``
    raised in the task (FAILURE with its traceback), or caught by it (it
    then returns normally); the ``soft_time_limit`` call option; a task in
    ``time.sleep`` (on threads it sees the exception when the sleep returns:
    later, with the same outcome)."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("soft_limited"), "uncaught")
        observe.get_and_meta(observe.send("soft_caught"), "caught")
        observe.get_and_meta(observe.send("limited_by_message", (5,), soft_time_limit=0.5),
                             "call-option")
        observe.get_and_meta(observe.send("blocking", (3,), soft_time_limit=0.5), "blocked")
        all_slots_serve(observe, "slots")
        records(observe, "records", until=returned(4))
        observe.log_problems("log", normalise_log)

    celery_obs, cc_obs = differential(run_differential, scenario, broker, pool)
    assert celery_obs["uncaught.raw"]["result"]["exc_type"] == "SoftTimeLimitExceeded"
    assert celery_obs["caught"]["value"] == "cleaned up after SoftTimeLimitExceeded()"
    assert celery_obs["blocked"]["state"] == "FAILURE"
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# Where limits come from: worker flags, remote control
# --------------------------------------------------------------------------


@pytest.mark.parametrize("pool", list(POOLS))
def test_worker_time_limit_flags(broker, run_differential, pool):
    """``--soft-time-limit`` / ``--time-limit`` apply to tasks without their
    own limits (the soft one caught, then the hard one); a task's own win."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("persistent"), "flags")
        observe.get_and_meta(observe.send("soft_caught", (10,)), "own-limits-win")
        all_slots_serve(observe, "slots")
        records(observe, "records", until=returned(2))
        observe.log_problems("log", normalise_log)

    celery_obs, cc_obs = differential(
        run_differential, scenario, broker, pool,
        extra_flags=("--soft-time-limit", "0.5", "--time-limit", "1.5"))
    assert celery_obs["flags.raw"]["result"]["exc_message"] == [1.5]
    assert celery_obs["own-limits-win"]["value"] == "cleaned up after SoftTimeLimitExceeded()"
    assert celery_obs == cc_obs


@pytest.mark.parametrize("pool", list(POOLS))
def test_control_time_limit(broker, run_differential, pool):
    """``celery control time_limit``: the reply, and the limits apply to the
    next task of that type; set back to none, it runs unlimited again.

    **Differs** (docs/compat.md): Celery 5.7's worker copies a task type's
    limits into its request class when its consumer starts
    (``create_request_cls``), so the command changes nothing until the
    consumer restarts (a reconnection, ``pool_restart``); its task runs
    unlimited. ccworker applies it to the next task, as the command says.
    The replies and the run after the reset are compared; the limited run
    is asserted per side.
    """
    task_name = f"{PROJECT}.tasks.control_limited"
    limited: dict = {}

    def scenario(app, observe):
        node = observe.worker.nodename

        def control(soft, hard):
            return app.control.time_limit(task_name, soft=soft, hard=hard,
                                          destination=[node], reply=True, timeout=5)

        observe.record("set", control(0.5, 1))
        try:
            result = observe.send("control_limited", (3,))
            try:
                value = result.get(timeout=30, propagate=False)
            except Exception as exc:  # a timeout: recorded, the assertion shows it
                value = exc
            limited[observe.worker.kind] = (result.state, repr(value))
        finally:
            observe.record("reset", control(None, None))
        observe.get_and_meta(observe.send("control_limited", (1.2,)), "unlimited")

    celery_obs, cc_obs = differential(run_differential, scenario, broker, pool)
    assert celery_obs["set"] == [{"<nodename>": {"ok": "time limits set successfully"}}]
    assert celery_obs["unlimited"]["value"] == "finished"
    assert celery_obs == cc_obs
    for kind, seen in limited.items():
        # ccworker applies the command; Celery 5.7 does not (see above).
        expected = ("FAILURE", "TimeLimitExceeded(1)") if kind == "ccworker" else (
            "SUCCESS", "'finished'")
        assert seen == expected, kind
