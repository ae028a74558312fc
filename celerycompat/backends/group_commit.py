"""Group commit of SUCCESS writes: the slot is free before the write is done.

Why: on Redis a stored result costs one round trip, and until now the pool
slot waited for it, so a worker could never run tasks faster than one write
per slot per round trip (about 65% of a no-op task's time on solo, by
cProfile). Here the SUCCESS meta is encoded in the task's thread (the value
cannot change under us), handed to one writer thread that sends whatever has
queued up in one pipeline, and the task's slot is free at once.

What still waits for the write is everything a client could observe out of
order (see `consumer.Consumer._settle`): the ack of an ``acks_late``
message (its result is always stored before it is acked, so a crash in
between only redelivers; an early-acked message was acked at the start),
the ``task-succeeded`` event, and a warm shutdown. Writes that
something reads right after them stay synchronous: chord members (the chord
counter reads the header results), FAILURE/RETRY/REVOKED, STARTED, and
the SUCCESS of a task with its own ``on_success``/``after_return`` (user
code that Celery runs after the store; `allow_deferring`).

`enable` records the pid, so only the process that called it defers: the
worker itself for solo, threads and gevent, and each prefork child for its
own tasks (pools/child.py says ``done`` at once and ``written`` when the
write lands; the parent holds the settle until then). A process forked
from one that defers does not, until it enables it for itself.

The pending writes of the current run are collected per thread (per
greenlet under gevent), and `take` hands them to the runner's `Outcome`.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable

from celerycompat.runlocal import RunLocal

logger = logging.getLogger("celery.backends")

#: Writes sent per pipeline at most.
BATCH_MAX = 256

try:  # -P asyncio's task greenlets (pools/asyncio_pool.py)
    from greenlet import getcurrent as _getcurrent
except ImportError:  # pragma: no cover - greenlet comes with the asyncio/gevent extras
    _getcurrent = None

#: Deferring is on in this process (`enable`); a forked child starts with it
#: off (`_after_fork_in_child`) until it enables it itself.
_enabled = False
_local = RunLocal("group_commit")
#: One writer per result store *identity* in this process (see `shared_writer`).
_writers: dict[Any, GroupWriter] = {}
_writers_pid: int | None = None
_writers_lock = threading.Lock()


def enable() -> None:
    """Defer SUCCESS writes in this process (not in processes forked later)."""
    global _enabled
    _enabled = True


def disable() -> None:
    global _enabled
    _enabled = False


def enabled() -> bool:
    """Deferring is on in this process, and allowed for the current run."""
    return _enabled and _local.get("deferrable", True)


def allow_deferring(allowed: bool) -> None:
    """Set for each run (`TaskRunner`): a task with its own ``on_success`` or
    ``after_return`` writes synchronously, so the hook (which Celery runs
    after the store) finds the result stored, and a process that dies in it
    leaves the result stored, as under Celery."""
    _local.set("deferrable", allowed)


#: Guards every `Write`'s state: callbacks are added on the consumer's
#: thread while the writer's thread finishes writes.
_completion_lock = threading.Lock()


class Write:
    """The completion of a deferred write (or of several: `take`).

    The part of ``concurrent.futures.Future`` the consumer uses (``done``,
    ``exception``, ``add_done_callback``), without the Condition and lock
    every Future builds: there is one of these per task on the hot path.
    Callbacks run on the thread that finishes the write (or at once, on the
    caller's, when it is finished already).
    """

    __slots__ = ("_done", "_error", "_callbacks")

    def __init__(self) -> None:
        self._done = False
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Any], None]] | None = None

    def done(self) -> bool:
        return self._done

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The write's error (None: stored); waits up to ``timeout`` if not done."""
        if not self._done:
            finished = threading.Event()
            self.add_done_callback(lambda _: finished.set())
            if not finished.wait(timeout):
                raise TimeoutError("the result write has not finished")
        return self._error

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        with _completion_lock:
            if not self._done:
                if self._callbacks is None:
                    self._callbacks = []
                self._callbacks.append(callback)
                return
        callback(self)

    def finish(self, error: BaseException | None = None) -> None:
        """Done (``error`` None: stored); the first call wins."""
        with _completion_lock:
            if self._done:
                return
            self._error = error
            self._done = True
            callbacks, self._callbacks = self._callbacks, None
        for callback in callbacks or ():
            try:
                callback(self)
            except Exception:
                logger.exception("A result write's callback raised")


def write_through(writer: Callable[[], GroupWriter], item: Any,
                  direct: Callable[[], Any]) -> Any:
    """A write the run must see stored before it goes on (it may not be deferred).

    Normally ``direct()``: the run's thread writes it. A ``-P asyncio`` run
    shares its thread with every other run of the loop, so its greenlet
    offers ``wait_for``: the item goes through ``writer()`` (batched with
    the others) and only that run waits for it, while the loop goes on.
    """
    wait_for = getattr(_getcurrent(), "wait_for", None) if _getcurrent else None
    if wait_for is None:
        return direct()
    write = writer().submit(item)
    wait_for(write)
    error = write.exception()
    if error is not None:
        raise error
    return None


def add_pending(write: Any) -> None:
    """Record a deferred write of this thread's current run (a `Write`, or
    anything with the same ``add_done_callback``/``exception``)."""
    pending = _local.get("pending")
    if pending is None:
        pending = []
        _local.set("pending", pending)
    pending.append(write)


def take() -> Any:
    """The writes deferred by this thread's run so far, as one `Write` (or None)."""
    pending = _local.get("pending")
    if not pending:
        return None
    _local.set("pending", [])
    if len(pending) == 1:
        return pending[0]
    combined = Write()
    remaining = [len(pending)]

    def one_done(done: Any) -> None:
        error = done.exception()
        with _completion_lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if error is not None:
            combined.finish(error)
        elif last:
            combined.finish()

    for write in pending:
        write.add_done_callback(one_done)
    return combined


def _after_fork_in_child() -> None:
    """A forked process gets fresh locks and no writers, and defers nothing
    until it enables deferring itself (a prefork child does, in its start).

    The prefork supervisor forks replacement children while the consumer
    thread takes `_completion_lock` for every task; a child forked at that
    moment would inherit the lock held by a thread it does not have and
    hang in its first write, holding its job's ack for ever. The parent's
    writers' threads do not exist in the child either.
    """
    global _completion_lock, _writers_lock, _writers_pid, _enabled
    _enabled = False
    _completion_lock = threading.Lock()
    _writers_lock = threading.Lock()
    _writers.clear()
    _writers_pid = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def shared_writer(identity: Any,
                  write_batch: Callable[[list[Any]], list[BaseException | None]]) -> GroupWriter:
    """The process's writer for stores that write to the same place.

    Why: Celery's ``app.backend`` is per thread, so a threads pool has one
    store (and so one writer) per pool thread, each sending small batches.
    Stores whose ``identity`` is equal write the same items to the same
    server the same way, so they can share one writer and fill its batches:
    the first store's ``write_batch`` serves them all. A process forked
    later (threads die in a fork) starts a registry of its own.
    """
    global _writers_pid
    with _writers_lock:
        if _writers_pid != os.getpid():
            _writers.clear()
            _writers_pid = os.getpid()
        writer = _writers.get(identity)
        if writer is None:
            writer = _writers[identity] = GroupWriter(write_batch)
        return writer


#: Put on a writer's queue to wake it (an item is held: see `GroupWriter.hold`).
_WAKE = (None, None)


class Amendable:
    """An item `GroupWriter.hold` keeps back until ``not_before``
    (``time.monotonic``), and that `GroupWriter.amend` may change until then.

    Why: an early ack, held when its task starts, waits a few milliseconds
    for the task's SUCCESS to join it (riding_acks.py); a long task's ack
    goes alone.
    """

    __slots__ = ("not_before",)

    def __init__(self, not_before: float = 0.0) -> None:
        self.not_before = not_before


class GroupWriter:
    """One writer thread for one result store.

    ``write_batch(items)`` writes a list of submitted items and returns one
    exception-or-None per item; it runs on the writer thread only.
    """

    def __init__(self, write_batch: Callable[[list[Any]], list[BaseException | None]],
                 name: str = "result-writer") -> None:
        self._write_batch = write_batch
        self._queue: queue.SimpleQueue[tuple[Any, Write]] = queue.SimpleQueue()
        #: Held items by identity, oldest first (one delay for all: the first
        #: is due first). Guarded by ``_holding``: an item is amended while
        #: held, or was taken for writing; never both.
        self._held: dict[int, tuple[Any, Write]] = {}
        self._holding = threading.Lock()
        #: The writer is waiting (or about to) with no deadline: `hold` wakes it.
        self._idle = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> Write:
        write = Write()
        self._queue.put((item, write))
        return write

    def hold(self, item: Amendable) -> Write:
        """Submit ``item`` to be written at ``item.not_before`` unless amended first."""
        write = Write()
        with self._holding:
            self._held[id(item)] = (item, write)
            wake, self._idle = self._idle, False
        if wake:
            # The writer waits with no deadline; otherwise it wakes at the
            # first held item's, which is due sooner (one delay for all).
            self._queue.put(_WAKE)
        return write

    def amend(self, item: Amendable, change: Callable[[Amendable], None]) -> bool:
        """Apply ``change`` to a held ``item`` and write it now (True); False:
        it is being written or written already."""
        with self._holding:
            entry = self._held.pop(id(item), None)  # held items are alive: ids are theirs
            if entry is None:
                return False
            change(item)
        self._queue.put(entry)
        return True

    def _run(self) -> None:
        while True:
            with self._holding:
                timeout = None
                if self._held:
                    first = next(iter(self._held.values()))[0]
                    timeout = max(0.0, first.not_before - time.monotonic())
                self._idle = timeout is None
            try:
                incoming = [self._queue.get(timeout=timeout)]
            except queue.Empty:
                incoming = []
            while len(incoming) < BATCH_MAX:
                try:
                    incoming.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batch = [*self._due(), *(entry for entry in incoming if entry is not _WAKE)]
            if batch:
                self._write(batch)

    def _due(self) -> list[tuple[Any, Write]]:
        """Held items whose time has come, taken out of ``_held``."""
        now = time.monotonic()
        due: list[tuple[Any, Write]] = []
        with self._holding:
            held = self._held
            while held:
                key, entry = next(iter(held.items()))
                if entry[0].not_before > now:
                    break
                del held[key]
                due.append(entry)
        return due

    def _write(self, batch: list[tuple[Any, Write]]) -> None:
        try:
            errors = self._write_batch([item for item, _ in batch])
        except BaseException as exc:  # the whole batch failed
            logger.error("Could not store %d results: %r", len(batch), exc)
            errors = [exc] * len(batch)
        for (_, write), error in zip(batch, errors):
            write.finish(error)
