"""Soft and hard time limits for tasks that run in threads of the worker process.

Celery enforces time limits only on its prefork pool (Celery issues #1958,
#9203): its ``threads`` and ``solo`` pools accept the settings and ignore
them. Ours enforce them on every pool. The prefork pool signals and kills
child processes; the ``solo`` pool uses ``SIGALRM`` (`celerycompat.pools.solo`);
this module is what the ``threads`` pool uses:

* `Watchdog`: one thread per pool that knows the soft and hard deadlines of
  the runs in progress (no thread or timer per task). At the soft limit it
  calls ``on_soft`` (the pool logs Celery's warning) and raises
  ``SoftTimeLimitExceeded`` inside the task's thread; at the hard limit it
  marks the run expired, raises `HardTimeLimitUnwind` inside the thread and
  calls ``on_hard`` (the pool reports Celery's hard-limit FAILURE at once
  and starts a replacement thread, so the slot is free on time).
  `Watchdog.take_over` does the same at any moment, for the pool to end a
  run on request (``revoke(terminate=True)``, `TerminateUnwind`).
* `guarded_runner`: a `TaskRunner` that tells the pool when a run starts its
  final result write. From then on the run is finished as far as limits go:
  whichever comes first, the run's own result or the hard limit's FAILURE,
  is the only outcome stored and reported; the other is dropped (the runner
  is stopped before it writes, or the hard limit does not fire).

CPython delivers an exception raised in another thread
(``PyThreadState_SetAsyncExc``) only when that thread runs Python bytecode.
A task blocked in a C call (``time.sleep(100)``, a socket read without a
timeout, a long C extension call) sees its soft limit only when the call
returns, and is unwound only then. The hard limit does not wait for that:
the FAILURE is stored, the slot freed and a new thread started on time; the
old thread finishes its call in the background and what it reports is
discarded. A task that catches ``BaseException`` and carries on can keep its
thread forever (not its slot).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Any, Callable

from billiard.exceptions import SoftTimeLimitExceeded

from celerycompat.execution import coroutines

logger = logging.getLogger("celery.worker.request")

#: Run phases. IDLE: no run, or the run is past its limits (its result is
#: being written). RUNNING: the limits apply. EXPIRED: the hard limit (or
#: ``revoke(terminate=True)``) took the run over; nothing the run does is
#: reported any more. Only the watchdog (`Watchdog.take_over` for terminate)
#: moves a run from RUNNING to EXPIRED, under its lock; only the run's own
#: thread moves it between IDLE and RUNNING, under the lock too.
IDLE = "idle"
RUNNING = "running"
EXPIRED = "expired"


class RunUnwind(BaseException):
    """Unwinds a run the pool has taken over (hard time limit, terminate).

    A ``BaseException`` so that ``except Exception`` in task code does not
    swallow it: the task's ``finally`` blocks run, nothing else does. The
    outcome clients see is the one the pool records for the take-over.
    """


class HardTimeLimitUnwind(RunUnwind):
    """Unwinds a task past its hard time limit (the pool stores ``TimeLimitExceeded``)."""


class TerminateUnwind(RunUnwind):
    """Unwinds a task ended by ``revoke(terminate=True)`` (REVOKED is stored by the
    consumer, as Celery's main process stores it for a terminated child)."""


# -- raising in another thread ---------------------------------------------------

try:
    _api = ctypes.pythonapi
    _set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
        ("PyThreadState_SetAsyncExc", _api))
    _clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
        ("PyThreadState_SetAsyncExc", _api))
except (AttributeError, OSError):  # not CPython
    _set_async_exc = _clear_async_exc = None


def can_interrupt_threads() -> bool:
    """Whether this interpreter can raise an exception inside another thread."""
    return _set_async_exc is not None


def raise_in_thread(ident: int, exc_type: type[BaseException]) -> bool:
    """Have thread ``ident`` raise ``exc_type()`` at its next bytecode.

    A class, not an instance: CPython instantiates it without arguments.
    Returns whether the thread exists (and the interpreter supports it).
    """
    if coroutines.deliver(ident, exc_type, cancel=issubclass(exc_type, RunUnwind)):
        return True  # an ``async def`` task: to the coroutine, at its await
    if _set_async_exc is None:
        return False
    return _set_async_exc(ident, exc_type) == 1


def clear_in_thread(ident: int) -> None:
    """Drop an exception `raise_in_thread` left pending for thread ``ident``."""
    if _clear_async_exc is not None:
        _clear_async_exc(ident, None)


# -- one run's deadlines ---------------------------------------------------------


class Deadline:
    """The limits of the run in progress in one thread (reused run after run)."""

    __slots__ = ("ident", "phase", "soft", "hard", "soft_at", "hard_at", "soft_fired",
                 "armed")

    def __init__(self, ident: int | None = None) -> None:
        self.ident = ident
        """``threading.get_ident()`` of the thread the runs happen in."""
        self.phase = IDLE
        self.soft: Any = None
        self.hard: Any = None
        """The limits as given (seconds, int or float: log lines show them as is)."""
        self.soft_at: float | None = None
        self.hard_at: float | None = None
        self.soft_fired = False
        self.armed = False
        """The watchdog tracks this run (it has a limit)."""


class Watchdog:
    """One thread that fires the soft and hard limits of a pool's runs.

    ``on_soft(deadline)`` is called before ``SoftTimeLimitExceeded`` is
    raised in the run's thread; ``on_hard(deadline)`` after
    `HardTimeLimitUnwind` was raised there and the run marked EXPIRED. Both
    are called on the watchdog thread with `lock` held, so the run cannot
    finish meanwhile: keep them short (log a line, start a thread). The pool
    may use `lock` for its own state that ``on_hard`` changes.
    """

    def __init__(self, on_soft: Callable[[Deadline], None],
                 on_hard: Callable[[Deadline], None], *,
                 name: str = "TimeLimitWatchdog",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.on_soft = on_soft
        self.on_hard = on_hard
        self.name = name
        self.clock = clock
        # A plain Lock (its ``with`` is entered in C): a run's thread takes
        # it while an exception may be pending for it, and must never be
        # left holding it when that exception arrives.
        self.lock = threading.Lock()
        self._cond = threading.Condition(self.lock)
        self._armed: set[Deadline] = set()
        self._wake_at = float("inf")
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- called by the run's own thread -------------------------------------------

    def begin(self, d: Deadline, soft: Any, hard: Any) -> None:
        """A run starts now in ``d``'s thread with these limits (seconds or None).

        A run the pool took over before it began (`take_over`) stays EXPIRED:
        the exception raised in its thread unwinds it.
        """
        with self._cond:
            if d.phase is EXPIRED:
                return
            d.soft_fired = False
            if not soft and not hard:
                d.armed = False
                d.phase = RUNNING
                return
            now = self.clock()
            d.soft, d.hard = soft or None, hard or None
            d.soft_at = now + float(soft) if soft else None
            # As Celery's prefork pool: the hard limit never comes before the soft
            # one (it is scheduled ``hard - soft`` after it, at once if negative).
            d.hard_at = now + max(float(hard), float(soft or 0)) if hard else None
            first = d.soft_at if d.soft_at is not None else d.hard_at
            d.armed = True
            d.phase = RUNNING
            self._armed.add(d)
            if first is not None and first < self._wake_at:
                self._cond.notify()

    def release(self, d: Deadline) -> bool:
        """The run in ``d`` is past its limits (it writes its result, or it ended).

        Returns False if the pool took it over first (hard limit, terminate):
        the caller must then neither store nor report anything. May be called
        more than once per run. Must be called from the run's own thread: it
        drops an exception the watchdog left pending for it. Always under the
        lock, limits or not: `take_over` may expire any running run.
        """
        with self.lock:
            if d.phase is EXPIRED:
                clear_in_thread(d.ident)  # the take-over's, if not seen yet
                return False
            if d.phase is RUNNING:
                d.phase = IDLE
                self._armed.discard(d)
                if d.soft_fired:
                    clear_in_thread(d.ident)  # the soft limit came too late
            d.armed = False
            return True

    def take_over(self, d: Deadline, exc_type: type[RunUnwind]) -> bool:
        """Expire the run in ``d`` now and raise ``exc_type`` in its thread.

        For ``revoke(terminate=True)``: the pool then reports for the run, as
        the watchdog's ``on_hard`` does for a hard limit. The caller holds
        `lock`. False if the run is not within its limits any more (it is
        writing its result, or has ended): too late to take over.
        """
        if d.phase is not RUNNING:
            return False
        d.phase = EXPIRED
        d.armed = False
        self._armed.discard(d)
        raise_in_thread(d.ident, exc_type)
        return True

    # -- the watchdog thread ---------------------------------------------------------

    def running(self) -> int:
        """How many runs with limits are being watched."""
        return len(self._armed)

    def _loop(self) -> None:
        with self._cond:
            while not self._stopping:
                now = self.clock()
                wake_at = float("inf")
                for d in list(self._armed):
                    wake_at = min(wake_at, self._check(d, now))
                self._wake_at = wake_at
                timeout = None if wake_at == float("inf") else max(0.0, wake_at - now)
                if timeout != 0.0:
                    self._cond.wait(timeout)

    def _check(self, d: Deadline, now: float) -> float:
        """Fire what is due for ``d``; return when to look at it next."""
        if d.soft_at is not None and not d.soft_fired:
            if now < d.soft_at:
                return d.soft_at
            d.soft_fired = True
            self._call(self.on_soft, d)
            raise_in_thread(d.ident, SoftTimeLimitExceeded)
            return d.hard_at if d.hard_at is not None else self._done(d)
        if d.hard_at is None:
            return self._done(d)
        if now < d.hard_at:
            return d.hard_at
        d.phase = EXPIRED
        self._armed.discard(d)
        raise_in_thread(d.ident, HardTimeLimitUnwind)
        self._call(self.on_hard, d)
        return float("inf")

    def _done(self, d: Deadline) -> float:
        """Nothing more can fire for ``d``: stop looking at it (it stays RUNNING)."""
        self._armed.discard(d)
        return float("inf")

    @staticmethod
    def _call(callback: Callable[[Deadline], None], d: Deadline) -> None:
        try:
            callback(d)
        except Exception:
            logger.critical("time limit callback failed", exc_info=True)


# -- knowing when a run's result is being written ---------------------------------


class _FinalWriteGuard:
    """A result store that calls ``before()`` ahead of every final state write.

    Final states are the ones a run ends with (SUCCESS, FAILURE, RETRY,
    REVOKED); ``STARTED`` is not. ``before()`` raises to prevent the write.
    A soft limit whose exception arrives just then came too late: it is
    dropped and the run's result is written.
    """

    __slots__ = ("_store", "_hook")

    def __init__(self, store: Any, before: Callable[[], None]) -> None:
        self._store = store
        self._hook = before

    def _before(self) -> None:
        while True:
            try:
                return self._hook()
            except SoftTimeLimitExceeded:
                continue

    @property
    def backend(self) -> Any:
        return self._store.backend

    def mark_as_done(self, *args: Any, **kwargs: Any) -> Any:
        self._before()
        return self._store.mark_as_done(*args, **kwargs)

    def mark_as_failure(self, *args: Any, **kwargs: Any) -> Any:
        self._before()
        return self._store.mark_as_failure(*args, **kwargs)

    def mark_as_retry(self, *args: Any, **kwargs: Any) -> Any:
        self._before()
        return self._store.mark_as_retry(*args, **kwargs)

    def mark_as_revoked(self, *args: Any, **kwargs: Any) -> Any:
        self._before()
        return self._store.mark_as_revoked(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def guarded_runner(runner: Any, before_final_write: Callable[[], None]) -> Any:
    """A sibling of ``runner`` (same app and settings) whose result stores
    call ``before_final_write()`` before a run's final state is written.

    The pool's hook decides there, under the watchdog's lock, whether the
    run or its hard limit owns the outcome (`Watchdog.release`).
    """
    store_for = runner.store_for

    def guarded_store_for(app: Any, backend: Any) -> Any:
        return _FinalWriteGuard(store_for(app, backend), before_final_write)

    return runner.with_stores(guarded_store_for)
