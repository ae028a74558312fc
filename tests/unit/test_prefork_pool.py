"""The prefork pool: its protocol's pure parts, and the pool with real forks.

The protocol functions are checked against billiard's own where billiard
has them (the texts of WorkerLostError are part of what a client reads).
The pool tests fork real children from this process and run tasks of an
in-memory app; what the parent records for them goes to a recording store.
Wire behaviour against ``celery worker`` is in tests/interop/test_prefork.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid

import pytest
from billiard.common import SIGMAP as BILLIARD_SIGMAP
from billiard.common import human_status as billiard_human_status
from billiard.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded, WorkerLostError
from celery import Celery
from hypothesis import given
from hypothesis import strategies as st

from celerycompat.backends import group_commit
from celerycompat.execution.outcome import Outcome, Settle, State, settle
from celerycompat.execution.runner import RunSettings, TaskRunner
from celerycompat.pools import procproto
from celerycompat.pools.prefork import PreforkPool
from celerycompat.protocol.message import TaskMessage

# --------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------


@given(st.lists(st.tuples(st.text(), st.integers(), st.binary()), min_size=1, max_size=8),
       st.integers(min_value=1, max_value=64))
def test_frames_survive_any_chunking(messages, chunk):
    stream = b"".join(procproto.dumps(m) for m in messages)
    reader = procproto.FrameReader()
    out = []
    for i in range(0, len(stream), chunk):
        out.extend(reader.feed(stream[i:i + chunk]))
    assert out == messages
    assert reader.pending == 0


def test_recv_message_keeps_frames_that_arrive_together():
    a, b = __import__("socket").socketpair()
    try:
        a.sendall(procproto.dumps(("one",)) + procproto.dumps(("two",)))
        reader = procproto.FrameReader()
        assert procproto.recv_message(b, reader) == ("one",)
        assert procproto.recv_message(b, reader) == ("two",)
        a.close()
        assert procproto.recv_message(b, reader) is None
    finally:
        b.close()


def test_sigmap_is_billiards():
    assert procproto.SIGMAP == BILLIARD_SIGMAP


@pytest.mark.parametrize("exitcode", [0, 1, 3, 155, -2, -6, -9, -11, -15, -64, None])
def test_human_status_is_billiards(exitcode):
    assert procproto.human_status(exitcode) == billiard_human_status(exitcode)


def test_worker_lost_texts():
    assert procproto.worker_lost_text(-9, 4) == \
        "Worker exited prematurely: signal 9 (SIGKILL) Job: 4."
    assert procproto.worker_lost_text(-11, 0) == \
        "Worker exited prematurely: signal 11 (SIGSEGV) Job: 0."
    assert procproto.worker_lost_text(3, 12) == "Worker exited prematurely: exitcode 3 Job: 12."
    # the task's own SystemExit (celery.worker.request.Request._worker_lost_info)
    assert procproto.self_exit_text(4) == "Worker exited prematurely: exitcode 4."
    assert procproto.self_exit_text(None) == "Worker exited prematurely: exitcode 0."
    assert procproto.self_exit_text("bye") == "Worker exited prematurely: exitcode 1."


def test_exitcode_from_status():
    assert procproto.exitcode_from_status(3 << 8) == 3
    assert procproto.exitcode_from_status(signal.SIGKILL) == -9


class _Task:
    def __init__(self, time_limit=None, soft_time_limit=None):
        self.time_limit, self.soft_time_limit = time_limit, soft_time_limit


@pytest.mark.parametrize(("header", "task", "worker", "expected"), [
    (None, _Task(), (None, None), (None, None)),
    ([None, None], _Task(), (30.0, 20.0), (30.0, 20.0)),
    ([None, None], _Task(5, 4), (30.0, 20.0), (5, 4)),
    ([2, 1], _Task(5, 4), (30.0, 20.0), (2, 1)),
    ([2, None], _Task(5, 4), (None, None), (2, 4)),
    ([None, 1.5], None, (None, None), (None, 1.5)),
    ("garbage", _Task(5, None), (None, None), (5, None)),
])
def test_time_limit_precedence(header, task, worker, expected):
    assert procproto.time_limits(header, task, *worker) == expected


@pytest.mark.parametrize(("outcome", "acks_late", "expected"), [
    (Outcome(State.FAILURE, is_worker_lost=True, requeue=True), True, Settle.REQUEUE),
    (Outcome(State.FAILURE, is_worker_lost=True, requeue=True), False, Settle.NOTHING),
    (Outcome(State.FAILURE, is_worker_lost=True), True, Settle.ACK),
    (Outcome(State.SUCCESS, is_worker_lost=True), True, Settle.ACK),
    (Outcome(State.RETRY, is_worker_lost=True), True, Settle.ACK),
])
def test_settle_worker_lost(outcome, acks_late, expected):
    assert settle(outcome, acks_late=acks_late, acks_on_failure_or_timeout=True) is expected


def test_settle_worker_lost_without_acks_on_failure_drops():
    assert settle(Outcome(State.FAILURE, is_worker_lost=True), acks_late=True,
                  acks_on_failure_or_timeout=False) is Settle.DROP


# --------------------------------------------------------------------------
# The pool, with real children
# --------------------------------------------------------------------------


class RecordingStore:
    """What the parent stores for children that cannot (lost, timed out)."""

    def __init__(self, backend):
        self.backend = backend
        self.failures = []

    def mark_as_failure(self, task_id, exc, traceback=None, request=None,
                        store_result=True, call_errbacks=True):
        self.failures.append((task_id, exc, traceback))

    def mark_as_started(self, *a, **kw):
        pass

    def mark_as_done(self, *a, **kw):
        pass

    def mark_as_retry(self, *a, **kw):
        pass


@pytest.fixture
def app():
    app = Celery(f"t{uuid.uuid4().hex[:6]}", broker="memory://", backend="cache+memory://",
                 set_as_current=False)

    @app.task(name="t.pid", shared=False)
    def pid():
        return os.getpid()

    @app.task(name="t.die", shared=False)
    def die(how):
        if how == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(3)

    @app.task(name="t.sleep", shared=False)
    def sleep(seconds):
        try:
            time.sleep(seconds)
        except SoftTimeLimitExceeded:
            return "soft"
        return "slept"

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


@pytest.fixture
def make_pool(app):
    pools = []
    stores = []

    def make(limit=2, store_class=None, **kwargs):
        def store_for(app, backend):
            store = (store_class or RecordingStore)(backend)
            stores.append(store)
            return store

        runner = TaskRunner(app, RunSettings(hostname="t@h"), store_for)
        pool = PreforkPool(runner, limit, hostname="t@h", **kwargs)
        pool.start()
        pool.stores = stores
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.stop(wait=False)


def run(pool, msg, timeout=15.0) -> Outcome:
    done = threading.Event()
    box = []

    def on_done(outcome):
        box.append(outcome)
        done.set()

    pool.apply(msg.task, msg, on_done)
    assert done.wait(timeout), "no outcome"
    assert len(box) == 1
    return box[0]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_tasks_run_in_the_children(make_pool):
    pool = make_pool(2)
    outcome = run(pool, message("t.pid"))
    assert outcome.state is State.SUCCESS and outcome.retval is None
    child_pid = int(outcome.result_repr)
    assert child_pid != os.getpid() and child_pid in pool.processes
    assert len(pool.processes) == 2
    info = pool.info()
    assert info["implementation"] == "celery.concurrency.prefork:TaskPool"
    assert info["max-concurrency"] == 2 and info["writes"]["total"] == 1


@pytest.mark.parametrize(("how", "status"), [("sigkill", "signal 9 (SIGKILL)"),
                                             ("exit3", "exitcode 3")])
def test_a_dead_child_is_reported_and_replaced(make_pool, how, status):
    pool = make_pool(2)
    before = set(pool.processes)
    first = run(pool, message("t.pid"))  # job 0
    msg = message("t.die", (how,))  # job 1
    outcome = run(pool, msg)
    assert outcome.state is State.FAILURE and outcome.is_worker_lost
    text = f"Worker exited prematurely: {status} Job: 1."
    assert outcome.exception_repr == repr(WorkerLostError(text))
    [(task_id, exc, traceback)] = pool.stores[-1].failures
    assert task_id == msg.id and isinstance(exc, WorkerLostError) and traceback is None
    assert str(exc) == text
    assert wait_for(lambda: len(pool.processes) == 2)
    assert set(pool.processes) != before
    assert first.state is State.SUCCESS
    assert run(pool, message("t.pid")).state is State.SUCCESS


def test_hard_time_limit_kills_and_replaces(make_pool):
    pool = make_pool(1)
    started = time.monotonic()
    outcome = run(pool, message("t.sleep", (30,), timelimit=[0.5, None]))
    assert time.monotonic() - started < 5
    assert outcome.state is State.FAILURE and outcome.is_timeout
    assert outcome.exception_repr == repr(TimeLimitExceeded(0.5))
    [(_, exc, traceback)] = pool.stores[-1].failures
    assert exc.args == (0.5,) and traceback is None
    assert run(pool, message("t.pid")).state is State.SUCCESS


def test_soft_time_limit_raises_in_the_task(make_pool):
    pool = make_pool(1, soft_time_limit=0.3)
    outcome = run(pool, message("t.sleep", (30,)))
    assert outcome.state is State.SUCCESS and outcome.result_repr == "'soft'"


def test_max_tasks_per_child_recycles(make_pool):
    pool = make_pool(1, max_tasks_per_child=2)
    pids = [int(run(pool, message("t.pid")).result_repr) for _ in range(5)]
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[1] != pids[2] != pids[4]


def test_warm_stop_waits_for_children(make_pool):
    pool = make_pool(2)
    pids = list(pool.processes)
    pool.stop(wait=True)
    assert pool.processes == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# --------------------------------------------------------------------------
# Deferred SUCCESS writes (group commit) in the children
# --------------------------------------------------------------------------


def _deferred_writes(items):
    """The children's writer: how long a write takes is the task's result."""
    for _task_id, result in items:
        time.sleep({"slow": 0.3, "stuck": 60}.get(result, 0))
    return [None] * len(items)


class DeferringStore(RecordingStore):
    """Defers SUCCESS as the Redis store does, when group commit is on."""

    def mark_as_done(self, task_id, result, request=None, store_result=True):
        if group_commit.enabled():
            writer = group_commit.shared_writer("test-deferring", _deferred_writes)
            group_commit.add_pending(writer.submit((task_id, result)))


@pytest.fixture
def deferring_pool(app, make_pool):
    @app.task(name="t.value", shared=False)
    def value(v):
        return v

    class WithAfterReturn(app.Task):
        def after_return(self, *args):
            pass

    @app.task(name="t.hooked", base=WithAfterReturn, shared=False)
    def hooked(v):
        return v

    return lambda limit=1: make_pool(limit, store_class=DeferringStore)


def test_a_child_reports_done_before_its_result_is_stored(deferring_pool):
    pool = deferring_pool()
    outcome = run(pool, message("t.value", ("slow",)))
    assert outcome.state is State.SUCCESS
    assert outcome.durable is not None and not outcome.durable.done()
    # The child is free meanwhile: the next task runs before the write ends.
    assert run(pool, message("t.value", ("fast",))).state is State.SUCCESS
    assert not outcome.durable.done()
    assert outcome.durable.exception(timeout=5) is None


def test_a_task_with_its_own_after_return_stores_before_it(deferring_pool):
    pool = deferring_pool()
    assert run(pool, message("t.hooked", ("slow",))).durable is None
    assert run(pool, message("t.value", ("fast",))).durable is not None


def test_a_warm_stop_waits_for_the_childrens_writes(deferring_pool):
    pool = deferring_pool()
    outcome = run(pool, message("t.value", ("slow",)))
    pool.stop(wait=True)
    assert outcome.durable.done() and outcome.durable.exception() is None


def test_a_write_cut_off_by_a_dead_child_is_a_lost_worker(deferring_pool):
    pool = deferring_pool()
    msg = message("t.value", ("stuck",))
    outcome = run(pool, msg)
    [pid] = pool.processes
    os.kill(pid, signal.SIGKILL)
    error = outcome.durable.exception(timeout=10)
    assert isinstance(error, WorkerLostError)
    assert str(error) == "Worker exited prematurely: signal 9 (SIGKILL) Job: 0."


# --------------------------------------------------------------------------
# Remote control: terminate, grow, shrink, restart
# --------------------------------------------------------------------------


def start(pool, msg):
    """Apply ``msg``; return the list its outcome will be appended to."""
    box: list = []
    pool.apply(msg.task, msg, box.append)
    return box


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_terminate_signals_the_child_and_reports_revoked(make_pool, signum):
    pool = make_pool(2)
    msg = message("t.sleep", (30,))
    box = start(pool, msg)
    assert wait_for(lambda: pool.pid_for(msg.id) is not None)
    victim = pool.pid_for(msg.id)
    assert pool.terminate(msg.id, signum) is True
    assert wait_for(lambda: box), "no outcome"
    assert [outcome.state for outcome in box] == [State.REVOKED]
    # Not a lost worker: the parent stored nothing (it made no result store at all).
    assert all(store.failures == [] for store in pool.stores)
    assert wait_for(lambda: len(pool.processes) == 2 and victim not in pool.processes)
    assert run(pool, message("t.pid")).state is State.SUCCESS


def test_terminate_of_a_job_no_child_took_yet(make_pool):
    pool = make_pool(1)
    busy = start(pool, message("t.sleep", (1,)))
    waiting = message("t.pid")
    box = start(pool, waiting)
    assert pool.terminate(waiting.id, signal.SIGTERM) is True
    assert wait_for(lambda: box) and box[0].state is State.REVOKED
    assert wait_for(lambda: busy) and busy[0].state is State.SUCCESS
    assert pool.terminate("no-such-task", signal.SIGTERM) is False


def test_withdraw_takes_back_only_jobs_no_child_took(make_pool):
    """``queue_ahead``: the pool takes jobs beyond its children; ``withdraw``
    takes back those still waiting (their ``on_done`` never called), never
    one a child runs."""
    pool = make_pool(1)
    assert pool.queue_ahead == pool.limit == 1
    running_msg = message("t.sleep", (0.5,))
    running = start(pool, running_msg)
    assert wait_for(lambda: pool.pid_for(running_msg.id) is not None)
    waiting_msg, last_msg = message("t.pid"), message("t.pid")
    waiting, last = start(pool, waiting_msg), start(pool, last_msg)
    taken = pool.withdraw([running_msg, waiting_msg])
    assert [m.id for m in taken] == [waiting_msg.id]
    assert pool.withdraw([waiting_msg]) == []  # once
    assert wait_for(lambda: running and last)
    assert running[0].state is State.SUCCESS and last[0].state is State.SUCCESS
    time.sleep(0.2)
    assert waiting == []


def test_grow_and_shrink(make_pool):
    pool = make_pool(2)
    pool.grow(2)
    assert pool.limit == 4
    assert wait_for(lambda: len(pool.processes) == 4)
    assert pool.info()["max-concurrency"] == 2  # Celery's shows the size it started with
    pool.shrink(1)
    assert pool.limit == 3 and wait_for(lambda: len(pool.processes) == 3)
    busy = start(pool, message("t.sleep", (2,)))
    assert wait_for(lambda: any(w["task_id"] for w in pool.workers()))
    with pytest.raises(ValueError, match="All processes busy"):
        pool.shrink(3)  # two are idle: they stop, then billiard's error
    assert pool.limit == 1
    assert wait_for(lambda: busy) and busy[0].state is State.SUCCESS
    assert len(pool.processes) == 1


def test_restart_replaces_every_child_once_idle(make_pool):
    pool = make_pool(2)
    before = set(pool.processes)
    busy = start(pool, message("t.sleep", (1,)))
    pool.restart()
    assert wait_for(lambda: busy) and busy[0].state is State.SUCCESS
    assert wait_for(lambda: len(pool.processes) == 2 and not before & set(pool.processes))
    assert run(pool, message("t.pid")).state is State.SUCCESS


def test_a_control_call_the_supervisor_did_not_take_is_withdrawn(monkeypatch, caplog):
    """``_call`` gives up after CALL_TIMEOUT; the call must then never run,
    or a late ``kill`` would end a task reported as not terminated."""
    from celerycompat.pools import prefork_supervisor as prefork

    monkeypatch.setattr(prefork, "CALL_TIMEOUT", 0.05)
    pool = PreforkPool(runner=None, limit=0, hostname="w@h")
    busy = threading.Event()
    pool._thread = threading.Thread(target=busy.wait, daemon=True)  # alive, never serving
    pool._thread.start()
    pool._wake = lambda: None
    ran = []
    try:
        assert pool._call(lambda: ran.append("kill") or True, default=False) is False
        pool._run_calls()  # the supervisor gets to its queue late
        assert ran == []
        assert "the request was withdrawn" in caplog.text
        # A call taken in time still answers.
        pool._thread = None
        assert pool._call(lambda: "answered") == "answered"
    finally:
        busy.set()
