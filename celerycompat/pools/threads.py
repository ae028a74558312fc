"""The threads pool: ``-P threads -c N`` runs tasks in N worker threads.

Tasks go through one queue to long-lived threads (no per-task thread or
future allocation). Completion is reported through ``on_done``, so the
pool needs no result plumbing of its own.

Time limits (message ``timelimit`` > task attribute > ``--time-limit`` /
``--soft-time-limit``, read when the task starts, so ``celery control
time_limit`` applies to the next task) are enforced here, which Celery's
threads pool does not do. One `Watchdog` thread watches the running tasks
(`celerycompat.pools.deadlines`):

* soft limit: Celery's warning line, then ``SoftTimeLimitExceeded`` raised
  inside the task's thread (the task may catch it);
* hard limit: the run is taken over at once. A new thread takes the slot;
  its first act is to record Celery's hard-limit outcome
  (`failures.hard_time_limit`: the log lines, FAILURE
  ``TimeLimitExceeded(N)``, ``on_failure``, ``after_return``,
  ``task_failure``) and report it. The old thread is unwound with
  `HardTimeLimitUnwind`; it leaves once unwound, and nothing it reports is
  used. Its result write is refused if it gets there after the hard limit
  (`guarded_runner`); if it got there first, its result stands and the hard
  limit does not fire.

A task blocked in a C call sees these exceptions only when the call returns
(CPython's limit, see `celerycompat.pools.deadlines`); the hard limit's
FAILURE and the freed slot do not wait for that.

``revoke(terminate=True)`` (`terminate`), which Celery's threads pool
refuses (``NotImplementedError``), takes a run over the way the hard limit
does: `TerminateUnwind` is raised in its thread, a new thread takes the slot
at once, and the run is reported as ``State.REVOKED`` (the consumer stores
and announces REVOKED, as Celery's main process does for prefork). A job
still in the queue is dropped when a thread picks it up. The signal number
is not used: any signal ends the run, as SIGTERM/SIGKILL end a prefork child.

A thread taken over this way is *abandoned*: it leaves when its unwind
exception lands, which a task blocked in a C call (a socket read without
timeout, a lock) delays until the call returns, perhaps for ever. The pool
abandons at most as many threads as it has slots (`max_abandoned`); past
that, a slot taken over is not given a new thread until an abandoned one
ends (an ERROR line says so), so a task that hangs in C again and again
costs slots, as it would on Celery's threads pool (which has no limits at
all), and never an unbounded number of threads.

``pool_grow``/``pool_shrink``/``--autoscale`` (`grow`, `shrink`; Celery's
threads pool has neither) start threads, or ask as many threads to leave
once they are idle.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from typing import Any, Callable

from billiard.exceptions import SoftTimeLimitExceeded

from celerycompat.execution import coroutines
from celerycompat.execution.outcome import Outcome, State
from celerycompat.execution.runner import TaskRunner
from celerycompat.pools import failures
from celerycompat.pools.base import OnDone, SlotsOnly, soft_limit_exceeded
from celerycompat.pools.deadlines import (
    EXPIRED,
    IDLE,
    RUNNING,
    Deadline,
    RunUnwind,
    TerminateUnwind,
    Watchdog,
    clear_in_thread,
    guarded_runner,
)
from celerycompat.pools.procproto import time_limits
from celerycompat.protocol.message import TaskMessage

logger = logging.getLogger("celery.worker.request")
pool_logger = logging.getLogger("celery.concurrency.thread")

_STOP = object()

#: How long ``stop(wait=True)`` waits for one thread before looking again
#: (a thread may be replaced meanwhile, after a hard limit).
_JOIN_STEP = 0.2


class _Slot(Deadline):
    """One serving thread, and the job it runs."""

    __slots__ = ("thread", "job", "first", "abandoned")

    def __init__(self) -> None:
        super().__init__()
        self.thread: threading.Thread | None = None
        self.job: tuple[str, TaskMessage, OnDone] | None = None
        self.first: Callable[[], None] | None = None
        """Run before serving: the hard-limit report of the slot this one replaces."""
        self.abandoned = False
        """Taken over (hard limit, terminate): out of the pool, counted until it ends."""


class ThreadPool(SlotsOnly):
    name = "celery.concurrency.thread:TaskPool"
    runs_inline = False
    task_join_will_block = True

    def __init__(self, runner: TaskRunner, limit: int, *, time_limit: Any = None,
                 soft_time_limit: Any = None) -> None:
        self.runner = runner
        self.limit = max(0, int(limit))
        self.time_limit = time_limit or None
        self.soft_time_limit = soft_time_limit or None
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._watchdog = Watchdog(self._on_soft, self._on_hard, name="ThreadPoolTimeLimits")
        self._lock = self._watchdog.lock
        self._local = threading.local()
        self._run = guarded_runner(runner, self._before_final_write)
        self._slots: list[_Slot] = []
        """The threads serving the queue (not ones abandoned at a hard limit)."""
        self._names = itertools.count()
        self._queued: dict[int, tuple[str, TaskMessage, OnDone]] = {}
        """Jobs applied and not yet picked up by a thread, by ``id(job)`` (lock)."""
        self._cancelled: dict[int, tuple[str, TaskMessage, OnDone]] = {}
        """Queued jobs terminated before a thread picked them up (lock)."""
        self._abandoned = 0
        """Threads taken over that have not ended yet (lock)."""
        self._owed = 0
        """Slots waiting for an abandoned thread to end before they get a thread (lock)."""
        self._stopping = False

    @property
    def max_abandoned(self) -> int:
        """How many taken-over threads may still be alive before slots wait for them."""
        return max(1, self.limit)

    # -- the Pool interface --------------------------------------------------------

    def start(self) -> None:
        self._watchdog.start()
        with self._lock:
            for _ in range(self.limit):
                self._start_slot(_Slot())

    def apply(self, task_name: str, message: TaskMessage, on_done: OnDone) -> None:
        job = (task_name, message, on_done)
        with self._lock:
            self._queued[id(job)] = job
        self._jobs.put(job)

    def terminate(self, task_id: str, signum: int) -> bool:
        """End the run of ``task_id``: unwound in its thread, its slot served by
        a new thread, reported as ``State.REVOKED`` (see the module docstring)."""
        taken: tuple[str, TaskMessage, OnDone] | None = None
        with self._lock:
            for key, job in self._queued.items():
                if job[1].id == task_id:
                    self._cancelled[key] = self._queued.pop(key)
                    return True  # the thread that picks it up reports it
            for slot in self._slots:
                job = slot.job
                if job is None or job[1].id != task_id:
                    continue
                if not self._watchdog.take_over(slot, TerminateUnwind):
                    return False  # writing its result already: too late
                self._abandon(slot, None)
                taken = job
                break
        if taken is None:
            return False
        _report(taken[2], Outcome(State.REVOKED))
        return True

    def grow(self, n: int = 1) -> None:
        """``n`` more threads (``pool_grow``, autoscale)."""
        n = max(0, int(n))
        with self._lock:
            self.limit += n
            for _ in range(n):
                self._start_slot(_Slot())

    def shrink(self, n: int = 1) -> None:
        """``n`` fewer slots (never below 0): as many threads leave, each once it
        is idle; the consumer starts no task beyond the new limit meanwhile."""
        with self._lock:
            n = min(max(0, int(n)), self.limit)
            self.limit -= n
        for _ in range(n):
            self._jobs.put(_STOP)

    def restart(self) -> None:
        """Tasks run in this process: there is nothing to restart (as Celery's)."""
        raise NotImplementedError(f"{type(self)} does not implement restart")

    def info(self) -> dict:
        """The ``pool`` section of ``inspect stats``, as Celery's threads pool reports it."""
        return {"implementation": self.name, "max-concurrency": self.limit,
                "threads": len(self._slots)}

    def pid_for(self, task_id: str) -> int:
        """Tasks run in this process (Celery reports a thread ident here, B38 FLAG)."""
        return os.getpid()

    def stop(self, wait: bool = True) -> None:
        with self._lock:
            self._stopping = True
            count = len(self._slots)
        for _ in range(count):
            self._jobs.put(_STOP)
        if wait:
            # Each thread removes itself when it leaves; a slot replaced
            # after a hard limit hands its _STOP to its replacement.
            while True:
                with self._lock:
                    threads = [s.thread for s in self._slots if s.thread is not None]
                if not threads:
                    break
                threads[0].join(_JOIN_STEP)
        self._watchdog.stop()

    # -- threads ----------------------------------------------------------------------

    def _start_slot(self, slot: _Slot) -> None:
        """Start ``slot``'s thread; the caller holds the lock."""
        slot.thread = threading.Thread(
            target=self._thread_main, args=(slot,),
            name=f"ThreadPoolExecutor-0_{next(self._names)}", daemon=True)
        self._slots.append(slot)
        slot.thread.start()

    def _thread_main(self, slot: _Slot) -> None:
        slot.ident = threading.get_ident()
        self._local.slot = slot
        try:
            self._serve_slot(slot)
        finally:
            coroutines.close_thread_loop()
            if slot.abandoned:
                self._abandoned_ended()

    def _serve_slot(self, slot: _Slot) -> None:
        try:
            if slot.first is not None:
                first, slot.first = slot.first, None
                first()
            self._serve(slot)
        except RunUnwind:
            pass  # unwound after the hard limit or terminate: already reported
        except BaseException:
            self._forget(slot)
            raise
        if slot.phase is not EXPIRED:
            self._forget(slot)
            return
        # Abandoned (the watchdog already took it out of the pool). The unwind
        # exception may still be pending if this thread left through its own
        # checks first: drop it, catching it should it arrive meanwhile.
        while True:
            try:
                clear_in_thread(slot.ident)
                return
            except RunUnwind:
                continue

    def _abandon(self, slot: _Slot, first: Callable[[], None] | None) -> bool:
        """``slot``'s thread was taken over: count it and give the slot a new
        thread that runs ``first``, unless too many taken-over threads are
        still alive (module docstring). The caller holds the lock. False if
        no thread was started (``first`` did not run)."""
        slot.abandoned = True
        if slot in self._slots:
            self._slots.remove(slot)
        self._abandoned += 1
        if self._abandoned > self.max_abandoned:
            self._owed += 1
            pool_logger.error(
                "%d pool threads are still running tasks taken over at their hard time "
                "limit or by terminate (blocked where the exception cannot reach them); "
                "the most the pool keeps is %d, so this slot waits for one of them to end "
                "(slots waiting: %d)", self._abandoned - 1, self.max_abandoned, self._owed)
            return False
        return self._replace(first)

    def _abandoned_ended(self) -> None:
        """An abandoned thread is leaving: a slot waiting for it gets a thread."""
        with self._lock:
            self._abandoned -= 1
            if self._owed and not self._stopping:
                self._owed -= 1
                if self._replace(None):
                    pool_logger.info("A pool slot got its thread back (slots waiting: %d)",
                                     self._owed)

    def _forget(self, slot: _Slot) -> None:
        with self._lock:
            if slot in self._slots:
                self._slots.remove(slot)

    def _serve(self, slot: _Slot) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            if not self._run_job(slot, job):
                return  # the hard limit took this thread's run: a new thread serves

    # -- one job ----------------------------------------------------------------------

    def _run_job(self, slot: _Slot, job: tuple[str, TaskMessage, OnDone]) -> bool:
        """Run one job and report it; False if the hard limit took it over."""
        task_name, message, on_done = job
        outcome: Outcome | None = None
        failure: BaseException | None = None
        with self._lock:
            self._queued.pop(id(job), None)
            cancelled = self._cancelled.pop(id(job), None) is not None
            if not cancelled:
                # From here `terminate` may take the run over (Watchdog.take_over).
                slot.job = job
                slot.phase = RUNNING
        if cancelled:
            _report(on_done, Outcome(State.REVOKED))
            return True
        try:
            task = self.runner.app.tasks[task_name]
            hard, soft = time_limits(message.timelimit, task, self.time_limit,
                                     self.soft_time_limit)
            self._watchdog.begin(slot, soft, hard)
            outcome = self._run.run(task, message)
        except RunUnwind:
            pass
        except BaseException as exc:
            failure = exc
        # From here the limits no longer apply. Their exception may arrive
        # inside `release` (fired just as the run ended): too late to matter.
        while True:
            try:
                live = self._watchdog.release(slot)
                break
            except (SoftTimeLimitExceeded, RunUnwind):
                continue
        slot.job = None
        if not live:
            return False
        if failure is not None:
            logger.critical("Task %s[%s] INTERNAL ERROR: %r", message.name, message.id,
                            failure, exc_info=(type(failure), failure, failure.__traceback__))
            outcome = Outcome(State.INTERNAL_ERROR, failure, exception_repr=repr(failure))
        elif outcome is None:
            outcome = Outcome(State.INTERNAL_ERROR)
        # SystemExit / KeyboardInterrupt from a task end the run, not the
        # thread: Celery's executor thread goes on serving too, and with
        # ``-c 1`` there would be no thread left to run anything.
        _report(on_done, outcome)
        return True

    def _before_final_write(self) -> None:
        """The runner is about to write the run's final state (see `guarded_runner`)."""
        slot = getattr(self._local, "slot", None)
        if slot is None or slot.phase is IDLE:
            return
        if not self._watchdog.release(slot):
            raise RunUnwind()

    # -- the watchdog's callbacks (its lock held) -----------------------------------

    def _on_soft(self, slot: Deadline) -> None:
        job = getattr(slot, "job", None)
        if job is not None:
            message = job[1]
            soft_limit_exceeded(slot.soft, message)

    def _on_hard(self, slot: Deadline) -> None:
        assert isinstance(slot, _Slot)
        job, hard = slot.job, slot.hard
        if job is None:
            if slot in self._slots:
                self._slots.remove(slot)
            return
        if not self._abandon(slot, lambda: self._report_hard_limit(job, hard)):
            self._report_hard_limit(job, hard)  # no thread to spare: report from here

    def _replace(self, first: Callable[[], None] | None) -> bool:
        """Start a thread for a slot whose thread was taken over; the caller
        holds the lock. ``first`` runs in it before it serves. False if no
        thread could be started (``first`` did not run)."""
        replacement = _Slot()
        replacement.first = first
        try:
            self._start_slot(replacement)
        except Exception as exc:
            pool_logger.error("Could not start a pool thread: %r", exc)
            if replacement in self._slots:
                self._slots.remove(replacement)
            return False
        return True

    def _report_hard_limit(self, job: tuple[str, TaskMessage, OnDone], hard: Any) -> None:
        task_name, message, on_done = job
        try:
            task = self.runner.app.tasks[task_name]
            outcome = failures.hard_time_limit(self.runner, task, message, hard)
        except Exception as exc:
            pool_logger.critical("Could not record a pool outcome: %r", exc, exc_info=True)
            outcome = Outcome(State.INTERNAL_ERROR, exc, exception_repr=repr(exc))
        _report(on_done, outcome)


def _report(on_done: OnDone, outcome: Outcome) -> None:
    try:
        on_done(outcome)
    except Exception:
        pool_logger.critical("on_done callback failed", exc_info=True)
