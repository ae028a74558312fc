"""Time limits outside prefork: the watchdog, and the threads and solo pools.

The watchdog and the primitives under it are tested with real threads; the
pools with an in-memory Celery app whose results go through Celery's own
cache backend (``cache+memory://``), so what is stored is what a client
would read. Limits are fractions of a second; waits are generous and only
bound a failure (no assertion is about how long something took). Wire
behaviour against ``celery worker -P prefork`` is in
tests/interop/test_time_limits.py.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid

import pytest
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery import Celery, signals

from celerycompat.backends import result_store_for
from celerycompat.execution.outcome import State
from celerycompat.execution.runner import RunSettings, TaskRunner
from celerycompat.pools.deadlines import (
    EXPIRED,
    IDLE,
    RUNNING,
    Deadline,
    HardTimeLimitUnwind,
    TerminateUnwind,
    Watchdog,
    clear_in_thread,
    guarded_runner,
    raise_in_thread,
)
from celerycompat.pools.solo import SoloPool
from celerycompat.pools.threads import ThreadPool
from celerycompat.protocol.message import TaskMessage

WAIT = 10.0


def spin(seconds: float) -> None:
    """Busy in Python bytecode (short sleeps), so async exceptions get through."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.005)


def wait_until(predicate, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


class Recorder:
    """Calls of the watchdog's callbacks, and what the run's thread saw."""

    def __init__(self) -> None:
        self.soft: list = []
        self.hard: list = []
        self.raised: list = []
        self.released: list = []
        self.done = threading.Event()

    def on_soft(self, d):
        self.soft.append((d, d.phase))

    def on_hard(self, d):
        self.hard.append((d, d.phase))


@pytest.fixture
def watchdog():
    made = []

    def make(recorder):
        dog = Watchdog(recorder.on_soft, recorder.on_hard, name="test-watchdog")
        dog.start()
        made.append(dog)
        return dog

    yield make
    for dog in made:
        dog.stop()


def run_in_thread(dog, recorder, soft, hard, body):
    """Begin a run with these limits in a new thread, run ``body``, release."""
    d = Deadline()

    def main():
        d.ident = threading.get_ident()
        try:
            try:
                dog.begin(d, soft, hard)
                body()
            except BaseException as exc:  # noqa: BLE001 - what the task saw
                recorder.raised.append(type(exc))
            while True:
                try:
                    recorder.released.append(dog.release(d))
                    break
                except (SoftTimeLimitExceeded, HardTimeLimitUnwind) as exc:
                    recorder.raised.append(type(exc))
        finally:
            recorder.done.set()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    return d, thread


# --------------------------------------------------------------------------
# Raising in another thread
# --------------------------------------------------------------------------


def test_raise_in_thread_is_seen_at_the_next_bytecode():
    seen = []
    started = threading.Event()

    def main():
        started.set()
        try:
            spin(WAIT)
        except SoftTimeLimitExceeded as exc:
            seen.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    started.wait(WAIT)
    assert raise_in_thread(thread.ident, SoftTimeLimitExceeded)
    thread.join(WAIT)
    assert not thread.is_alive()
    assert len(seen) == 1 and seen[0].args == ()  # instantiated without arguments


def test_a_pending_exception_can_be_dropped():
    """A thread blocked in C does not see the exception until the call
    returns; clearing it before then means it never sees it."""
    gate = threading.Lock()
    gate.acquire()
    seen = []

    def main():
        try:
            gate.acquire()  # blocked in C
            gate.release()
            spin(0.05)
            seen.append("no exception")
        except SoftTimeLimitExceeded:
            seen.append("raised")

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    time.sleep(0.05)
    assert raise_in_thread(thread.ident, SoftTimeLimitExceeded)
    clear_in_thread(thread.ident)
    gate.release()
    thread.join(WAIT)
    assert seen == ["no exception"]


def test_raise_in_a_thread_that_is_gone():
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    assert raise_in_thread(thread.ident, SoftTimeLimitExceeded) is False


# --------------------------------------------------------------------------
# The watchdog
# --------------------------------------------------------------------------


def test_soft_limit_raises_in_the_run_and_calls_on_soft(watchdog):
    rec = Recorder()
    dog = watchdog(rec)
    d, _ = run_in_thread(dog, rec, 0.1, None, lambda: spin(WAIT))
    assert rec.done.wait(WAIT)
    assert rec.soft == [(d, RUNNING)]
    assert rec.hard == []
    assert rec.raised == [SoftTimeLimitExceeded]
    assert rec.released == [True]
    assert d.phase is IDLE and dog.running() == 0


def test_soft_limit_can_be_caught(watchdog):
    rec = Recorder()
    dog = watchdog(rec)
    caught = []

    def body():
        try:
            spin(WAIT)
        except SoftTimeLimitExceeded:
            caught.append(True)

    run_in_thread(dog, rec, 0.1, None, body)
    assert rec.done.wait(WAIT)
    assert caught == [True] and rec.raised == [] and rec.released == [True]


def test_hard_limit_expires_the_run(watchdog):
    rec = Recorder()
    dog = watchdog(rec)
    d, thread = run_in_thread(dog, rec, None, 0.1, lambda: spin(WAIT))
    assert rec.done.wait(WAIT)
    assert rec.soft == []
    assert rec.hard == [(d, EXPIRED)]
    assert rec.raised == [HardTimeLimitUnwind]
    assert rec.released == [False]  # nothing the run does afterwards counts
    assert dog.running() == 0


def test_soft_then_hard(watchdog):
    """The task catches the soft limit and keeps going: the hard one follows."""
    rec = Recorder()
    dog = watchdog(rec)
    order = []

    def body():
        try:
            spin(WAIT)
        except SoftTimeLimitExceeded:
            order.append("soft")
        spin(WAIT)

    run_in_thread(dog, rec, 0.1, 0.3, body)
    assert rec.done.wait(WAIT)
    assert order == ["soft"]
    assert rec.raised == [HardTimeLimitUnwind]
    assert len(rec.soft) == len(rec.hard) == 1
    assert rec.released == [False]


def test_hard_not_before_soft(watchdog):
    """hard <= soft: the soft limit still fires first (Celery's prefork order:
    the warning, then the hard limit at once). A thread holds one pending
    exception, so the task may see only the unwind."""
    rec = Recorder()
    dog = watchdog(rec)
    d, _ = run_in_thread(dog, rec, 0.2, 0.1, lambda: spin(WAIT))
    assert rec.done.wait(WAIT)
    assert rec.soft == [(d, RUNNING)] and rec.hard == [(d, EXPIRED)]
    assert rec.raised[-1] is HardTimeLimitUnwind and rec.released == [False]


def test_released_in_time_nothing_fires(watchdog):
    rec = Recorder()
    dog = watchdog(rec)
    d, _ = run_in_thread(dog, rec, 0.3, 0.4, lambda: None)
    assert rec.done.wait(WAIT)
    time.sleep(0.6)  # past both deadlines
    assert rec.soft == rec.hard == rec.raised == []
    assert rec.released == [True] and d.phase is IDLE


def test_no_limits_costs_no_tracking(watchdog):
    rec = Recorder()
    dog = watchdog(rec)
    d, _ = run_in_thread(dog, rec, None, None, lambda: None)
    assert rec.done.wait(WAIT)
    assert not d.armed and rec.released == [True] and dog.running() == 0


def test_take_over_unwinds_a_run_without_limits(watchdog):
    """``revoke(terminate=True)`` on the threads pool: any running run, limits or not."""
    rec = Recorder()
    dog = watchdog(rec)
    d, _ = run_in_thread(dog, rec, None, None, lambda: spin(WAIT))
    assert wait_until(lambda: d.phase is RUNNING)
    with dog.lock:
        assert dog.take_over(d, TerminateUnwind) is True
        assert dog.take_over(d, TerminateUnwind) is False  # once
    assert rec.done.wait(WAIT)
    assert rec.raised == [TerminateUnwind] and rec.released == [False]
    assert d.phase is EXPIRED and rec.hard == []  # the pool reports, not on_hard


def test_take_over_before_begin_is_not_undone_by_begin(watchdog):
    rec = Recorder()
    dog = watchdog(rec)
    d = Deadline(threading.get_ident())
    d.phase = RUNNING  # the pool marks a run RUNNING when its thread picks it up
    taken = []

    def take_over():
        with dog.lock:
            taken.append(dog.take_over(d, TerminateUnwind))

    try:
        other = threading.Thread(target=take_over)
        other.start()
        other.join()
        dog.begin(d, 5, 10)
        spin(1.0)
        raise AssertionError("the take-over's exception did not arrive")
    except TerminateUnwind:
        pass
    assert taken == [True]
    assert d.phase is EXPIRED and dog.running() == 0 and dog.release(d) is False


def test_take_over_of_a_released_run_is_refused(watchdog):
    rec = Recorder()
    dog = watchdog(rec)
    d, _ = run_in_thread(dog, rec, None, None, lambda: None)
    assert rec.done.wait(WAIT)
    with dog.lock:
        assert dog.take_over(d, TerminateUnwind) is False
    assert d.phase is IDLE


def test_many_runs_each_at_its_own_deadline(watchdog):
    """One watchdog, several threads: each fires for its own run only."""
    dog_rec = Recorder()
    dog = watchdog(dog_rec)
    recs = [Recorder() for _ in range(4)]
    limits = [0.1, None, 0.2, None]
    deadlines = []
    for rec, limit in zip(recs, limits):
        body = (lambda: spin(WAIT)) if limit else (lambda: spin(0.4))
        deadlines.append(run_in_thread(dog, rec, None, limit, body)[0])
    for rec in recs:
        assert rec.done.wait(WAIT)
    assert [rec.raised for rec in recs] == [[HardTimeLimitUnwind], [],
                                            [HardTimeLimitUnwind], []]
    assert [rec.released for rec in recs] == [[False], [True], [False], [True]]
    assert {id(d) for d, _ in dog_rec.hard} == {id(deadlines[0]), id(deadlines[2])}


def test_stop_with_nothing_running(watchdog):
    dog = Watchdog(lambda d: None, lambda d: None)
    dog.start()
    dog.stop()
    dog.stop()  # twice is fine


# --------------------------------------------------------------------------
# guarded_runner
# --------------------------------------------------------------------------


@pytest.fixture
def app():
    app = Celery(f"t{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://",
                 set_as_current=False)
    app.records = []
    records = app.records

    @app.task(shared=False, name="t.add")
    def add(x, y):
        return x + y

    @app.task(shared=False, name="t.spin")
    def spin_task(seconds):
        spin(seconds)
        return "finished"

    @app.task(shared=False, name="t.block")
    def block(seconds):
        time.sleep(seconds)  # a C call: a thread sees async exceptions only after it
        return "finished"

    app.gate = threading.Event()

    @app.task(shared=False, name="t.gate")
    def gate():
        try:
            app.gate.wait(WAIT)  # blocked in a C lock acquire until the test opens it
        finally:
            records.append("woke")
        return "finished"

    @app.task(shared=False, name="t.catch_soft", soft_time_limit=0.1)
    def catch_soft():
        try:
            spin(WAIT)
        except SoftTimeLimitExceeded as exc:
            return f"cleaned up after {exc!r}"
        return "finished"

    @app.task(shared=False, name="t.stubborn", time_limit=0.2)
    def stubborn():
        """Swallows everything, even the unwind, and returns."""
        try:
            spin(WAIT)
        except BaseException:  # noqa: BLE001
            records.append("swallowed")
        return "too late"

    @app.task(shared=False, name="t.hard", time_limit=0.2)
    def hard():
        try:
            spin(WAIT)
        finally:
            records.append("finally")
        return "finished"

    app.finalize()
    return app


def message(task: str, args=(), timelimit=None) -> TaskMessage:
    task_id = str(uuid.uuid4())
    request = {"id": task_id, "task": task, "retries": 0, "args": list(args),
               "kwargs": {}, "timelimit": timelimit, "delivery_info": {}}
    return TaskMessage(task=task, id=task_id, name=task, args=list(args), kwargs={},
                       embed={"callbacks": None, "errbacks": None, "chain": None,
                              "chord": None},
                       request=request, delivery_info={}, timelimit=timelimit)


def runner_for(app) -> TaskRunner:
    return TaskRunner(app, RunSettings(hostname="t@h"), result_store_for)


def test_guarded_runner_calls_the_hook_before_final_writes_only(app):
    calls = []
    runner = guarded_runner(runner_for(app), lambda: calls.append("final"))
    app.tasks["t.add"].track_started = True
    try:
        msg = message("t.add", (2, 3))
        outcome = runner.run(app.tasks["t.add"], msg)
    finally:
        app.tasks["t.add"].track_started = False
    assert outcome.state is State.SUCCESS
    assert calls == ["final"]  # STARTED is not final; SUCCESS is
    assert app.AsyncResult(msg.id).result == 5


def test_guarded_runner_hook_can_refuse_the_write(app):
    def refuse():
        raise HardTimeLimitUnwind()

    runner = guarded_runner(runner_for(app), refuse)
    msg = message("t.add", (2, 3))
    with pytest.raises(HardTimeLimitUnwind):
        runner.run(app.tasks["t.add"], msg)
    assert app.AsyncResult(msg.id).state == "PENDING"


# --------------------------------------------------------------------------
# The threads pool
# --------------------------------------------------------------------------


class Outcomes:
    """``on_done`` per job: every call kept, so a second one would show."""

    def __init__(self) -> None:
        self.calls: dict[str, list] = {}
        self.cond = threading.Condition()

    def on_done(self, msg):
        def done(outcome):
            with self.cond:
                self.calls.setdefault(msg.id, []).append(outcome)
                self.cond.notify_all()
        return done

    def wait(self, msg, timeout=WAIT):
        with self.cond:
            self.cond.wait_for(lambda: msg.id in self.calls, timeout)
        return self.calls[msg.id][0]


@pytest.fixture
def thread_pool(app):
    pools = []

    def make(limit=2, **kwargs):
        pool = ThreadPool(runner_for(app), limit, **kwargs)
        pool.start()
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.stop(wait=False)


def apply(pool, outcomes, name, args=(), timelimit=None):
    msg = message(name, args, timelimit)
    pool.apply(name, msg, outcomes.on_done(msg))
    return msg


def test_threads_hard_limit(app, thread_pool, caplog):
    failures = []

    @signals.task_failure.connect(weak=False)
    def on_failure(sender=None, exception=None, **kwargs):
        failures.append(repr(exception))

    try:
        pool = thread_pool(2)
        out = Outcomes()
        with caplog.at_level("INFO"):
            msg = apply(pool, out, "t.hard")
            outcome = out.wait(msg)
    finally:
        signals.task_failure.disconnect(on_failure)
    assert outcome.state is State.FAILURE and outcome.is_timeout
    assert repr(outcome.retval) == "TimeLimitExceeded(0.2)"
    result = app.AsyncResult(msg.id)
    assert result.state == "FAILURE"
    assert isinstance(result.result, TimeLimitExceeded) and result.result.args == (0.2,)
    assert result.traceback is None
    assert failures == ["TimeLimitExceeded(0.2)"]
    messages = [r.getMessage() for r in caplog.records]
    assert f"Hard time limit (0.2s) exceeded for t.hard[{msg.id}]" in messages
    assert "Task handler raised error: TimeLimitExceeded(0.2)" in messages
    deadline = time.monotonic() + WAIT
    while "finally" not in app.records and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.records == ["finally"]  # the old thread was unwound
    assert pool.info() == {"implementation": "celery.concurrency.thread:TaskPool",
                           "max-concurrency": 2, "threads": 2}


def test_threads_hard_limit_frees_the_slot_of_a_thread_blocked_in_c(app, thread_pool):
    """The blocked thread cannot be unwound until its call returns; the
    FAILURE and a new thread do not wait for it, and what it does when it
    wakes up is neither stored nor reported."""
    pool = thread_pool(1)
    out = Outcomes()
    blocked = apply(pool, out, "t.gate", timelimit=[0.2, None])
    assert out.wait(blocked).state is State.FAILURE
    # The one slot serves again while the old thread is still blocked.
    nxt = apply(pool, out, "t.add", (1, 2))
    assert out.wait(nxt).state is State.SUCCESS
    assert app.records == []
    app.gate.set()
    deadline = time.monotonic() + WAIT
    while "woke" not in app.records and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.records == ["woke"]  # it woke up and was unwound
    time.sleep(0.1)
    assert len(out.calls[blocked.id]) == 1
    assert app.AsyncResult(blocked.id).state == "FAILURE"
    assert pool.info()["threads"] == 1


def test_threads_result_after_the_hard_limit_is_discarded(app, thread_pool):
    """A task that swallows the unwind and returns: its SUCCESS must not
    overwrite the stored FAILURE, nor be reported a second time."""
    pool = thread_pool(1)
    out = Outcomes()
    msg = apply(pool, out, "t.stubborn")
    assert out.wait(msg).state is State.FAILURE
    deadline = time.monotonic() + WAIT
    while "swallowed" not in app.records and time.monotonic() < deadline:
        time.sleep(0.01)
    after = apply(pool, out, "t.add", (2, 2))  # served by the replacement
    assert out.wait(after).retval == 4
    time.sleep(0.2)
    assert app.records == ["swallowed"]
    assert len(out.calls[msg.id]) == 1
    assert app.AsyncResult(msg.id).state == "FAILURE"


def test_threads_soft_limit(app, thread_pool, caplog):
    pool = thread_pool(2)
    out = Outcomes()
    with caplog.at_level("WARNING"):
        caught = apply(pool, out, "t.catch_soft")
        uncaught = apply(pool, out, "t.spin", (WAIT,), timelimit=[None, 0.1])
        caught_outcome = out.wait(caught)
        uncaught_outcome = out.wait(uncaught)
    assert caught_outcome.state is State.SUCCESS
    assert caught_outcome.retval == "cleaned up after SoftTimeLimitExceeded()"
    assert uncaught_outcome.state is State.FAILURE
    assert isinstance(uncaught_outcome.retval, SoftTimeLimitExceeded)
    assert app.AsyncResult(uncaught.id).state == "FAILURE"
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"Soft time limit (0.1s) exceeded for t.catch_soft[{caught.id}]" in messages
    assert f"Soft time limit (0.1s) exceeded for t.spin[{uncaught.id}]" in messages


def test_threads_worker_limits_and_task_attributes(app, thread_pool):
    """``--time-limit`` applies to tasks without their own; a changed task
    attribute (``celery control time_limit``) applies to the next run."""
    pool = thread_pool(1, time_limit=0.2)
    out = Outcomes()
    msg = apply(pool, out, "t.spin", (WAIT,))
    assert repr(out.wait(msg).retval) == "TimeLimitExceeded(0.2)"
    task = app.tasks["t.spin"]
    task.time_limit = 0.3
    try:
        msg = apply(pool, out, "t.spin", (WAIT,))
        assert repr(out.wait(msg).retval) == "TimeLimitExceeded(0.3)"
    finally:
        task.time_limit = None


def test_threads_stop_after_a_hard_limit(app, thread_pool):
    pool = thread_pool(2)
    out = Outcomes()
    msg = apply(pool, out, "t.hard")
    assert out.wait(msg).state is State.FAILURE
    pool.stop(wait=True)
    assert pool.info()["threads"] == 0


# --------------------------------------------------------------------------
# The solo pool (runs on this, the main, thread)
# --------------------------------------------------------------------------


def solo_apply(pool, name, args=(), timelimit=None):
    out = Outcomes()
    msg = message(name, args, timelimit)
    pool.apply(name, msg, out.on_done(msg))
    assert len(out.calls[msg.id]) == 1
    return msg, out.calls[msg.id][0]


@pytest.fixture
def solo(app):
    assert threading.current_thread() is threading.main_thread()
    return SoloPool(runner_for(app), "t@h")


def test_solo_hard_limit_interrupts_a_sleep(app, solo, caplog):
    with caplog.at_level("ERROR"):
        msg, outcome = solo_apply(solo, "t.block", (WAIT,), timelimit=[0.2, None])
    assert outcome.state is State.FAILURE and outcome.is_timeout
    assert repr(outcome.retval) == "TimeLimitExceeded(0.2)"
    result = app.AsyncResult(msg.id)
    assert result.state == "FAILURE" and result.traceback is None
    messages = [r.getMessage() for r in caplog.records]
    assert f"Hard time limit (0.2s) exceeded for t.block[{msg.id}]" in messages


def test_solo_soft_limit_interrupts_a_sleep(app, solo, caplog):
    with caplog.at_level("WARNING"):
        msg, outcome = solo_apply(solo, "t.block", (WAIT,), timelimit=[None, 0.2])
    assert outcome.state is State.FAILURE
    assert isinstance(outcome.retval, SoftTimeLimitExceeded)
    messages = [r.getMessage() for r in caplog.records]
    assert f"Soft time limit (0.2s) exceeded for t.block[{msg.id}]" in messages


def test_solo_soft_caught_and_hard_unwinds_finally(app, solo):
    _, outcome = solo_apply(solo, "t.catch_soft")
    assert outcome.retval == "cleaned up after SoftTimeLimitExceeded()"
    _, outcome = solo_apply(solo, "t.hard")
    assert outcome.state is State.FAILURE
    assert app.records == ["finally"]


def test_solo_result_after_the_hard_limit_is_discarded(app, solo):
    msg, outcome = solo_apply(solo, "t.stubborn")
    assert outcome.state is State.FAILURE and outcome.is_timeout
    assert app.records == ["swallowed"]
    assert app.AsyncResult(msg.id).state == "FAILURE"


def test_solo_restores_the_previous_alarm(app, solo):
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *a: fired.append("theirs"))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30)
        _, outcome = solo_apply(solo, "t.spin", (0.01,), timelimit=[5, 4])
        assert outcome.state is State.SUCCESS
        assert signal.getsignal(signal.SIGALRM) is not solo._on_alarm
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < remaining <= 30  # theirs, still running
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        spin(0.2)
        assert fired == ["theirs"]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_solo_without_limits_leaves_sigalrm_alone(app, solo):
    before = signal.getsignal(signal.SIGALRM)
    timer = signal.getitimer(signal.ITIMER_REAL)  # pytest-timeout may have one running
    _, outcome = solo_apply(solo, "t.add", (1, 1))
    assert outcome.retval == 2
    assert signal.getsignal(signal.SIGALRM) is before
    after = signal.getitimer(signal.ITIMER_REAL)
    assert (after[0] > 0) == (timer[0] > 0) and after[0] <= timer[0]


def test_solo_worker_limit_flag(app):
    pool = SoloPool(runner_for(app), "t@h", soft_time_limit=0.1)
    _, outcome = solo_apply(pool, "t.spin", (WAIT,))
    assert isinstance(outcome.retval, SoftTimeLimitExceeded)


def test_pool_info_has_celerys_shape(app):
    """The keys Celery's own pools report in ``inspect stats``."""
    from celery.concurrency.solo import TaskPool as CelerySolo
    from celery.concurrency.thread import TaskPool as CeleryThreads

    theirs = CeleryThreads(limit=3)
    try:
        assert set(ThreadPool(runner_for(app), 3).info()) == set(theirs.info)
    finally:
        theirs.on_stop()
    solo_theirs = CelerySolo(initargs=(None, "t@h")).info
    solo_ours = SoloPool(runner_for(app), "t@h").info()
    assert set(solo_ours) == set(solo_theirs)
    assert solo_ours["timeouts"] == list(solo_theirs["timeouts"])
