"""The solo pool: the task runs in the consumer's own thread, one at a time.

As with Celery's solo pool, nothing else (not even the broker connection)
is served while a task runs; it is the simplest and the cheapest pool.

Time limits (message ``timelimit`` > task attribute > ``--time-limit`` /
``--soft-time-limit``, read when the task starts) are enforced, which
Celery's solo pool does not do. The task runs on the worker's main thread,
so a ``SIGALRM`` timer (``setitimer(ITIMER_REAL)``) interrupts it, also in
a blocking call such as ``time.sleep``:

* soft limit: Celery's warning line, then ``SoftTimeLimitExceeded`` raised
  in the task (which may catch it);
* hard limit: `HardTimeLimitUnwind` unwinds the task (its ``finally``
  blocks and ``task_postrun`` run), then Celery's hard-limit outcome is
  recorded as the prefork pool records it (`failures.hard_time_limit`:
  log lines, FAILURE ``TimeLimitExceeded(N)``, ``on_failure``,
  ``after_return``, ``task_failure``).

The timer is disarmed once the run starts writing its final state (so a
limit never overwrites a result being stored), and the previous
``SIGALRM`` handler and timer are restored after each task. Tasks without
limits touch neither. A task that catches ``BaseException`` and carries on
cannot be stopped: the worker has no other thread.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded
from celery import signals

from celerycompat.celery_release import process_init_sender
from celerycompat.execution import coroutines
from celerycompat.execution.outcome import Outcome, State
from celerycompat.execution.runner import TaskRunner
from celerycompat.pools import failures
from celerycompat.pools.base import OnDone, SlotsOnly, run_guarded, soft_limit_exceeded
from celerycompat.pools.deadlines import (
    EXPIRED,
    IDLE,
    RUNNING,
    HardTimeLimitUnwind,
    guarded_runner,
)
from celerycompat.pools.procproto import time_limits
from celerycompat.protocol.message import TaskMessage

logger = logging.getLogger("celery.worker.request")
pool_logger = logging.getLogger("celery.concurrency.solo")

#: ``setitimer`` reads 0 as "disarm": the smallest delay for "at once".
_AT_ONCE = 1e-6


class SoloPool(SlotsOnly):
    name = "celery.concurrency.solo:TaskPool"
    runs_inline = True
    task_join_will_block = True

    def __init__(self, runner: TaskRunner, hostname: str, *, time_limit: Any = None,
                 soft_time_limit: Any = None) -> None:
        self.limit = 1
        self.runner = runner
        self.hostname = hostname
        self.time_limit = time_limit or None
        self.soft_time_limit = soft_time_limit or None
        self._run = guarded_runner(runner, self._before_final_write)
        self._phase = IDLE
        self._next: str | None = None
        """What the armed timer fires: "soft", "hard" or None."""
        self._soft: Any = None
        self._hard: Any = None
        self._message: TaskMessage | None = None
        self._warned_thread = False

    def start(self) -> None:
        # Celery's solo pool sends worker_process_init (sender = nodename):
        # projects use it to open per-process resources.
        signals.worker_process_init.send(sender=process_init_sender(self.hostname))

    def apply(self, task_name: str, message: TaskMessage, on_done: OnDone) -> None:
        task = self.runner.app.tasks.get(task_name)
        hard, soft = (None, None) if task is None else time_limits(
            message.timelimit, task, self.time_limit, self.soft_time_limit)
        if not (hard or soft) or not self._can_signal():
            run_guarded(self.runner, task_name, message, on_done)
            return
        self._apply_limited(task, message, on_done, hard, soft)

    def info(self) -> dict:
        """The ``pool`` section of ``inspect stats``, as Celery's solo pool reports it."""
        return {"implementation": self.name, "max-concurrency": 1,
                "processes": [os.getpid()], "max-tasks-per-child": None,
                "put-guarded-by-semaphore": True, "timeouts": []}

    def pid_for(self, task_id: str) -> int:
        """Tasks run in this process (Celery reports a thread ident here, B38 FLAG)."""
        return os.getpid()

    def terminate(self, task_id: str, signum: int) -> bool:
        """Never: a task runs on the consumer's own thread, so no control command
        (``revoke(terminate=True)``) is read while one runs, as with Celery's
        solo pool; by the time one is read, the task is over."""
        return False

    def restart(self) -> None:
        """Tasks run in this process: nothing to restart (as Celery's solo pool).

        There is no ``grow``/``shrink``: one task at a time is what solo is.
        """
        raise NotImplementedError(f"{type(self)} does not implement restart")

    def stop(self, wait: bool = True) -> None:
        """Nothing runs in the background; the loop of ``async def`` tasks
        (this thread's) is closed."""
        coroutines.close_thread_loop()

    # -- time limits ------------------------------------------------------------------

    def _can_signal(self) -> bool:
        """SIGALRM reaches Python code on the main thread only (an embedded
        worker may run its consumer elsewhere: limits are then not enforced)."""
        if threading.current_thread() is threading.main_thread():
            return True
        if not self._warned_thread:
            self._warned_thread = True
            pool_logger.warning("solo pool not on the main thread: time limits are not "
                                "enforced")
        return False

    def _apply_limited(self, task: Any, message: TaskMessage, on_done: OnDone,
                       hard: Any, soft: Any) -> None:
        self._soft, self._hard, self._message = soft, hard, message
        previous_timer = signal.setitimer(signal.ITIMER_REAL, 0)
        armed_at = time.monotonic()
        previous_handler = signal.signal(signal.SIGALRM, self._on_alarm)
        outcome: Outcome | None = None
        failure: BaseException | None = None
        try:
            try:
                self._phase = RUNNING
                self._next = "soft" if soft else "hard"
                signal.setitimer(signal.ITIMER_REAL, max(float(soft or hard), _AT_ONCE))
                outcome = self._run.run(task, message)
            finally:
                # No call before this store: a pending SIGALRM handler runs
                # only at a call or a backward jump, and then finds nothing to do.
                if self._phase is RUNNING:
                    self._phase = IDLE
                self._next = None
                signal.setitimer(signal.ITIMER_REAL, 0)
        except HardTimeLimitUnwind:
            pass
        except BaseException as exc:
            failure = exc
        finally:
            self._restore(previous_handler, previous_timer, armed_at)
            self._message = None
        if self._phase is EXPIRED:
            self._phase = IDLE
            outcome = self._hard_limit(task, message, hard)
        elif failure is not None:
            logger.critical("Task %s[%s] INTERNAL ERROR: %r", message.name, message.id,
                            failure, exc_info=(type(failure), failure, failure.__traceback__))
            outcome = Outcome(State.INTERNAL_ERROR, failure, exception_repr=repr(failure))
        elif outcome is None:
            outcome = Outcome(State.INTERNAL_ERROR)
        on_done(outcome)
        if failure is not None and not isinstance(failure, Exception):
            raise failure

    def _on_alarm(self, signum: int, frame: Any) -> None:
        """SIGALRM: fire the limit that is due, if the run is still within its limits."""
        if self._phase is not RUNNING:
            return
        message = self._message
        if self._next == "soft":
            if self._hard:
                self._next = "hard"
                delay = float(self._hard) - float(self._soft)
                signal.setitimer(signal.ITIMER_REAL, max(delay, _AT_ONCE))
            else:
                self._next = None
            if message is not None:
                soft_limit_exceeded(self._soft, message)
            _raise_here(SoftTimeLimitExceeded)
        elif self._next == "hard":
            self._next = None
            self._phase = EXPIRED
            _raise_here(HardTimeLimitUnwind)

    def _before_final_write(self) -> None:
        """The runner is about to write the run's final state: from now on the
        limits no longer apply (or, past the hard limit, the write is refused)."""
        if self._phase is RUNNING:
            self._phase = IDLE
            signal.setitimer(signal.ITIMER_REAL, 0)
        elif self._phase is EXPIRED:
            raise HardTimeLimitUnwind()  # the task swallowed it: its result is not ours

    @staticmethod
    def _restore(handler: Any, timer: tuple[float, float], armed_at: float) -> None:
        """Put back the SIGALRM handler and timer the task found."""
        signal.signal(signal.SIGALRM, handler if handler is not None else signal.SIG_DFL)
        delay, interval = timer
        if delay > 0:
            remaining = delay - (time.monotonic() - armed_at)
            signal.setitimer(signal.ITIMER_REAL, max(remaining, _AT_ONCE), interval)

    def _hard_limit(self, task: Any, message: TaskMessage, hard: Any) -> Outcome:
        try:
            return failures.hard_time_limit(self.runner, task, message, hard)
        except Exception as exc:
            pool_logger.critical("Could not record a pool outcome: %r", exc, exc_info=True)
            return Outcome(State.INTERNAL_ERROR, exc, exception_repr=repr(exc))


def _raise_here(exc_type: type[BaseException]) -> None:
    """Raise ``exc_type()`` in the task from the signal handler; for an
    ``async def`` task, at the coroutine's await (its loop runs right here)."""
    if not coroutines.deliver(threading.get_ident(), exc_type,
                              cancel=exc_type is HardTimeLimitUnwind):
        raise exc_type()
