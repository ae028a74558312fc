"""Group commit of SUCCESS writes (backends/group_commit.py): pure logic.

The Redis write itself is exercised by every interop test that stores a
result on solo, threads or gevent; here: which writes are pending for a run,
how they combine, batching on the writer thread, and errors.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future

import pytest

from celerycompat.backends import group_commit
from celerycompat.execution.outcome import Outcome, State


@pytest.fixture(autouse=True)
def _clean():
    group_commit.take()
    yield
    group_commit.disable()
    group_commit.allow_deferring(True)
    group_commit.take()


def test_enabled_only_in_the_process_that_enabled_it():
    assert not group_commit.enabled()
    group_commit.enable()
    assert group_commit.enabled()
    pid = os.fork()
    if pid == 0:  # a prefork child forked afterwards writes synchronously
        os._exit(0 if not group_commit.enabled() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_take_returns_this_threads_writes_once():
    assert group_commit.take() is None
    first: Future = Future()
    group_commit.add_pending(first)
    other: list = []
    thread = threading.Thread(target=lambda: other.append(group_commit.take()))
    thread.start()
    thread.join()
    assert other == [None]  # pending writes are per thread
    assert group_commit.take() is first
    assert group_commit.take() is None


def test_several_writes_combine_into_one_future():
    futures = [Future() for _ in range(3)]
    for future in futures:
        group_commit.add_pending(future)
    combined = group_commit.take()
    futures[0].set_result(None)
    futures[2].set_result(None)
    assert not combined.done()
    futures[1].set_result(None)
    assert combined.done() and combined.exception() is None


def test_a_failed_write_fails_the_combined_future():
    futures = [Future() for _ in range(2)]
    for future in futures:
        group_commit.add_pending(future)
    combined = group_commit.take()
    futures[0].set_exception(ConnectionError("down"))
    assert isinstance(combined.exception(timeout=1), ConnectionError)
    futures[1].set_result(None)  # a late success changes nothing


def test_writer_batches_what_queued_up_and_reports_per_item():
    batches: list[list] = []
    gate = threading.Event()

    def write_batch(items):
        gate.wait(5)
        batches.append(items)
        return [ValueError(item) if item == "bad" else None for item in items]

    writer = group_commit.GroupWriter(write_batch)
    first = writer.submit("a")  # taken alone while the gate is closed
    time.sleep(0.05)
    rest = [writer.submit(item) for item in ("b", "bad", "c")]
    gate.set()
    for future in [first, *rest]:
        future.exception(timeout=5)
    assert batches == [["a"], ["b", "bad", "c"]]
    assert [f.exception() is None for f in rest] == [True, False, True]


def test_writer_survives_a_batch_that_raises():
    calls = []

    def write_batch(items):
        calls.append(items)
        if len(calls) == 1:
            raise ConnectionError("backend down")
        return [None] * len(items)

    writer = group_commit.GroupWriter(write_batch)
    assert isinstance(writer.submit(1).exception(timeout=5), ConnectionError)
    assert writer.submit(2).exception(timeout=5) is None


class Held(group_commit.Amendable):
    __slots__ = ("value",)

    def __init__(self, value, not_before=0.0):
        super().__init__(not_before)
        self.value = value


def test_an_amendable_item_waits_until_due_and_an_amendment_sends_it_at_once():
    """An early ack waits for its SUCCESS to join it (riding_acks.py): held
    until ``not_before``; amended before the writer took it, it goes at once
    with the change; once taken, an amendment is refused."""
    batches: list[list] = []

    def write_batch(items):
        batches.append([item.value if isinstance(item, Held) else item for item in items])
        return [None] * len(items)

    writer = group_commit.GroupWriter(write_batch)
    joined = Held("ack-1", not_before=time.monotonic() + 5)
    joined_write = writer.hold(joined)
    plain = writer.submit("result-2")  # not amendable: goes at once
    assert plain.exception(timeout=5) is None
    assert not joined_write.done()
    assert writer.amend(joined, lambda item: setattr(item, "value", "ack-1+result-1"))
    assert joined_write.exception(timeout=1) is None
    assert ["ack-1+result-1"] in batches and ["result-2"] in batches

    alone = Held("ack-3", not_before=time.monotonic() + 0.05)
    alone_write = writer.hold(alone)
    assert alone_write.exception(timeout=5) is None  # due: went alone
    assert not writer.amend(alone, lambda item: setattr(item, "value", "late"))
    assert batches[-1] == ["ack-3"]


def test_outcome_after_write():
    outcome = Outcome(State.SUCCESS, 42, runtime=0.1)
    ok: Future = Future()
    ok.set_result(None)
    assert outcome.after_write(ok) is outcome
    failed: Future = Future()
    failed.set_exception(ConnectionError("down"))
    lost = outcome.after_write(failed)
    assert lost.state is State.INTERNAL_ERROR
    assert isinstance(lost.retval, ConnectionError)


def test_stores_of_one_identity_share_one_writer():
    def write_batch(items):
        return [None] * len(items)

    first = group_commit.shared_writer(("redis", "url-a"), write_batch)
    assert group_commit.shared_writer(("redis", "url-a"), write_batch) is first
    assert group_commit.shared_writer(("redis", "url-b"), write_batch) is not first
    pid = os.fork()
    if pid == 0:  # the writer thread did not survive the fork: a new one
        again = group_commit.shared_writer(("redis", "url-a"), write_batch)
        os._exit(0 if again is not first else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_per_thread_redis_backends_share_one_writer():
    """Celery's ``app.backend`` is per thread; its copies get one writer."""
    from celery import Celery

    from celerycompat.backends.redis import RedisResultStore

    app = Celery("shared-writer", broker="memory://",
                 backend="redis://127.0.0.1:6379/15")
    other = Celery("shared-writer-other", broker="memory://",
                   backend="redis://127.0.0.1:6379/14")
    backends = []
    for _ in range(2):
        thread = threading.Thread(target=lambda: backends.append(app.backend))
        thread.start()
        thread.join()
    assert backends[0] is not backends[1]  # no connection is made here
    stores = [RedisResultStore(app, backend) for backend in backends]
    elsewhere = RedisResultStore(other, other.backend)
    assert stores[0]._group_writer() is stores[1]._group_writer()
    assert elsewhere._group_writer() is not stores[0]._group_writer()


def test_a_write_runs_each_callback_once_on_whichever_side_comes_last():
    write = group_commit.Write()
    seen: list = []
    write.add_done_callback(lambda done: seen.append(("before", done.exception())))
    assert not write.done() and seen == []
    error = ConnectionError("down")
    write.finish(error)
    write.finish(None)  # the first outcome stands
    write.add_done_callback(lambda done: seen.append(("after", done.exception())))
    assert write.done() and seen == [("before", error), ("after", error)]


def test_a_write_can_be_waited_for_from_another_thread():
    write = group_commit.Write()
    with pytest.raises(TimeoutError):
        write.exception(timeout=0.01)
    threading.Timer(0.05, write.finish).start()
    assert write.exception(timeout=5) is None


def test_a_run_may_forbid_deferring_in_its_thread_only():
    group_commit.enable()
    group_commit.allow_deferring(False)
    assert not group_commit.enabled()
    other: list = []
    thread = threading.Thread(target=lambda: other.append(group_commit.enabled()))
    thread.start()
    thread.join()
    assert other == [True]
    group_commit.allow_deferring(True)
    assert group_commit.enabled()


def _fork_while_held(lock_name: str, in_child) -> int:
    """Fork while another thread holds ``group_commit.<lock_name>``; run
    ``in_child`` in the child under a 5 s alarm. The child's exit status."""
    import signal

    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with getattr(group_commit, lock_name):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    assert held.wait(5)
    try:
        pid = os.fork()
        if pid == 0:  # the child: a thread of the parent held the lock
            try:
                signal.alarm(5)  # a hang ends the child by SIGALRM
                in_child()
                os._exit(0)
            except BaseException:
                os._exit(3)
    finally:
        release.set()
        thread.join(5)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.mark.parametrize("lock_name, in_child", [
    # A prefork child's first deferred write: its Write completes and calls back.
    ("_completion_lock", lambda: group_commit.Write().add_done_callback(lambda _: None)),
    ("_completion_lock", lambda: group_commit.Write().finish()),
    # ... and its writer is looked up.
    ("_writers_lock", lambda: group_commit.shared_writer(("fork-test",), lambda items: [])),
])
def test_a_child_forked_while_a_thread_holds_a_lock_does_not_hang(lock_name, in_child):
    """The consumer thread takes `_completion_lock` for every task while the
    prefork supervisor forks replacement children: a child must not inherit
    it held (issue: a child that hangs in its first write holds its job's
    ack for ever)."""
    status = _fork_while_held(lock_name, in_child)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, \
        f"the child hung or failed (status {status:#x})"


def test_a_child_forked_while_another_thread_holds_the_locks_can_take_them():
    """Issue 16: the prefork supervisor forks replacement children while the
    consumer thread may hold the completion lock; the child inherits the
    lock taken by a thread it does not have and would hang in its first
    write. After a fork the child gets fresh locks."""
    held = threading.Event()
    release = threading.Event()

    def hold():
        with group_commit._completion_lock, group_commit._writers_lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(5)
        pid = os.fork()
        if pid == 0:
            ok = group_commit._completion_lock.acquire(timeout=2) and \
                group_commit._writers_lock.acquire(timeout=2)
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        holder.join(5)


def test_an_asyncio_run_waits_for_its_failure_write_off_the_loop():
    """On ``-P asyncio`` a write that may not be deferred (STARTED, RETRY,
    FAILURE) goes to the writer thread while only its run's greenlet waits
    (``wait_for``); any other thread writes it itself, as before."""
    greenlet = pytest.importorskip("greenlet")
    from celery import Celery

    from celerycompat.backends.redis import RedisResultStore

    app = Celery("write-through", broker="memory://", backend="redis://127.0.0.1:6379/15")
    store = RedisResultStore(app, app.backend)
    submitted, direct, waited = [], [], []

    class Writer:
        def submit(self, item):
            submitted.append(item)
            write = group_commit.Write()
            write.finish(None)
            return write

    store._group_writer = Writer
    store.backend.ensure = lambda fn, args: direct.append(args)

    class Run(greenlet.greenlet):
        def wait_for(self, write):
            waited.append(write.done())

    Run(lambda: store.mark_as_failure("t-1", ValueError("boom"))).switch()
    assert len(submitted) == 1 and submitted[0].key == b"celery-task-meta-t-1"
    assert b'"FAILURE"' in submitted[0].payload and waited == [True] and direct == []
    store.mark_as_failure("t-2", ValueError("boom"))  # a thread's own run
    assert len(submitted) == 1 and direct[0][0] == b"celery-task-meta-t-2"
