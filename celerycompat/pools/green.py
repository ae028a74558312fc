"""The green pools: ``-P gevent`` / ``-P eventlet`` run tasks in green threads of one process.

::

    main greenlet (consumer)              task greenlets (N slots)
    ------------------------              ------------------------------------
    apply(name, msg, on_done) ----------> _run: time limits armed (hub timers),
                                                 TaskRunner.run (results stored here)
    _done.get(timeout) / broker poll <--- on_done(Outcome)  (a queue put)
           (both yield to the hub)
                                          hub timers: soft -> SoftTimeLimitExceeded
                                          thrown into the greenlet; hard -> greenlet
                                          killed, then the prefork pool's hard-limit
                                          outcome recorded
    watchdog (an OS thread): says which task blocks the loop, and for how long

`GreenPool` is the pool; what differs between gevent and eventlet (how a
green thread is started, killed and joined, how a hub timer is set, the
log texts) is a `GreenRuntime`: gevent_pool.py and eventlet_pool.py.

The process must be monkey-patched before anything is imported
(`celerycompat.concurrency_patch`, run by both entry points for ``-P
gevent`` and ``-P eventlet``). Then the consumer's waits (the broker
socket, the ``_done`` queue, which patching makes green) yield to the hub,
task greenlets run while the consumer waits, and the consumer, remote
control and events run whenever a task waits: ``inspect ping`` is answered
while 1000 greenlets sleep.

Time limits, which Celery's green pools only half enforce (gevent: no soft
limit, the hard one through ``gevent.Timeout``; eventlet: none), are timers
on the hub, armed when
the greenlet starts, with the prefork pool's precedence (message
``timelimit`` > task attribute, which ``control time_limit`` changes >
``--time-limit``/``--soft-time-limit``):

* soft: Celery's "Soft time limit (Ns) exceeded for name[id]" warning, then
  ``SoftTimeLimitExceeded()`` raised in the task where it waits;
* hard: the greenlet is killed (`TaskKilled`, a ``GreenletExit``), given
  `HARD_KILL_GRACE` seconds to unwind (its ``finally`` blocks,
  ``task_postrun``), then the outcome is recorded exactly as the prefork
  parent records a hard limit (`failures.hard_time_limit`: FAILURE
  ``TimeLimitExceeded(N)``, ``on_failure``, ``after_return``,
  ``task_failure``, Celery's "Hard time limit" line). A task that swallows
  the kill goes on outside the pool (its slot is given back), with a
  warning, and its own result is never written over that FAILURE (its
  stores go through `deadlines.guarded_runner`, as the threads pool's do).
  Once a run starts writing its final result, its limits no longer apply.

Cooperative limits cannot interrupt code that never yields; that code
blocks every greenlet, which the watchdog (`hub_watchdog`) reports.

``revoke(terminate=True)`` (`terminate`) kills the task's greenlet as the
hard limit does (whatever the signal), and reports it as ``State.REVOKED``
once it has unwound (the consumer stores and announces REVOKED at once, as
Celery does). Celery's gevent pool kills it too, and then also sends a
``task-succeeded`` event with a ``None`` result for it; ours does not.

The slot count (``-c``, `limit`) is the consumer's to enforce: the runtime
tracks the greenlets without a bound of its own, so `grow`/`shrink`
(``pool_grow``, ``pool_shrink``, ``--autoscale``) only change `limit`.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, Callable, Iterator, Protocol

from celery.exceptions import SoftTimeLimitExceeded
from greenlet import GreenletExit

from celerycompat.execution.outcome import Outcome, State
from celerycompat.pools import failures, procproto
from celerycompat.pools.base import OnDone, SlotsOnly, soft_limit_exceeded
from celerycompat.pools.deadlines import guarded_runner
from celerycompat.pools.hub_watchdog import HubWatchdog, threshold_from_env
from celerycompat.protocol.message import TaskMessage

#: How long a greenlet killed at its hard limit may take to unwind before
#: the outcome is recorded without it.
HARD_KILL_GRACE = 1.0
#: Cold shutdown: how long killed greenlets may take to unwind.
COLD_KILL_GRACE = 1.0


class TaskKilled(GreenletExit):
    """Raised in a task greenlet that is being killed (hard limit, cold stop)."""


class GreenRuntime(Protocol):
    """What a green library offers `GreenPool` (gevent_pool.py, eventlet_pool.py).

    ``handle`` is the library's green thread object.
    """

    #: Celery's pool class (``inspect stats``), and the loggers of its pool.
    pool_name: str
    logger: logging.Logger

    def start(self) -> None:
        """Get ready to run tasks (in the thread that runs the hub)."""

    def spawn_task(self, run: Callable[[Any], None], job: Any) -> Any:
        """Start ``run(job)`` in a green thread of the pool's group; its handle.
        The handle is returned before ``run`` begins."""

    def spawn(self, function: Callable[..., Any], *args: Any) -> Any:
        """Start ``function(*args)`` in a green thread of its own."""

    def current(self) -> Any:
        """The running green thread's handle."""

    def kill(self, handle: Any, exc: Any) -> None:
        """Raise ``exc`` (a class or an instance) in ``handle``, without waiting for it."""

    def dead(self, handle: Any) -> bool:
        """True once ``handle`` has finished."""

    def join(self, handle: Any, timeout: float) -> None:
        """Wait until ``handle`` finished or ``timeout`` passed."""

    def forget(self, handle: Any) -> None:
        """Stop tracking ``handle`` in the group (it goes on outside the pool)."""

    def join_all(self) -> None:
        """Wait until every tracked green thread finished."""

    def kill_all(self, exc: Any, timeout: float) -> None:
        """Kill every tracked green thread; wait up to ``timeout`` for them."""

    def call_later(self, seconds: float, function: Callable[..., Any], *args: Any
                   ) -> Callable[[], None]:
        """Run ``function(*args)`` on the hub after ``seconds``; returns the cancel."""

    def watchdog(self, describe: Callable[[FrameType], str | None],
                 threshold: float) -> HubWatchdog:
        """The hub watchdog (hub_watchdog.py) for this library's loop."""


@dataclass(eq=False)
class Job:
    task_name: str
    message: TaskMessage
    on_done: OnDone
    greenlet: Any = None
    frame: FrameType | None = None
    hard: Any = None
    soft: Any = None
    cancel_timer: Callable[[], None] | None = None
    final: bool = False
    """The run is writing its final result: its limits no longer apply."""
    handled: bool = False
    """``on_done`` was called, or will be by whoever set this (hard limit),
    or must not be (cold stop)."""


class GreenPool(SlotsOnly):
    """Tasks in green threads of this process; the library is ``runtime``'s."""

    runs_inline = False
    task_join_will_block = False

    def __init__(self, runtime: GreenRuntime, runner: Any, limit: int, *,
                 time_limit: Any = None, soft_time_limit: Any = None,
                 blocking_threshold: float | None = None) -> None:
        self.green = runtime
        self.name = runtime.pool_name
        self.runner = runner
        self._runner = guarded_runner(runner, self._before_final_write)
        """Runs the tasks; `runner` (unguarded) records hard-limit outcomes."""
        self.limit = max(0, int(limit))
        self.time_limit = time_limit or None
        self.soft_time_limit = soft_time_limit or None
        self.blocking_threshold = blocking_threshold or threshold_from_env()
        self._started = False
        self._backends: list[Any] = []
        """Result backends of finished greenlets, for the next ones (see `_backend_slot`)."""
        self._jobs: dict[int, Job] = {}
        """Running jobs by ``id(job)``."""
        self._frames: dict[FrameType, Job] = {}
        """The bottom frame of each running task greenlet (for the watchdog)."""
        self._current: dict[Any, Job] = {}
        """The job each running task greenlet runs."""
        self.watchdog: HubWatchdog | None = None

    # -- the Pool interface --------------------------------------------------------

    def start(self) -> None:
        self.green.start()
        self._started = True
        self.watchdog = self.green.watchdog(self.describe, self.blocking_threshold)
        self.watchdog.start()

    def apply(self, task_name: str, message: TaskMessage, on_done: OnDone) -> None:
        assert self._started, "start() first"
        job = Job(task_name, message, on_done)
        self._jobs[id(job)] = job
        # The consumer only applies with a slot free (it counts them), so the
        # group needs no bound of its own.
        job.greenlet = self.green.spawn_task(self._run, job)

    def info(self) -> dict:
        """The ``pool`` section of ``inspect stats``, as Celery's green pools report it."""
        return {"implementation": self.name, "max-concurrency": self.limit}

    def pid_for(self, task_id: str) -> int:
        """Tasks run in this process (Celery reports a greenlet id here, B38 FLAG)."""
        return os.getpid()

    def terminate(self, task_id: str, signum: int) -> bool:
        """Kill the greenlet running ``task_id`` (any signal: greenlets have none).

        As at the hard limit: killed with `TaskKilled`, given `HARD_KILL_GRACE`
        to unwind, then reported (``State.REVOKED``); its own result is
        refused from now on (`_before_final_write`). False once the run is
        writing its result.
        """
        for job in list(self._jobs.values()):
            if job.message.id != task_id or job.handled or job.final:
                continue
            job.handled = True  # the greenlet's own report is void from now on
            self._disarm(job)
            self.green.kill(job.greenlet, TaskKilled)
            self.green.spawn(self._finish_terminated, job)
            return True
        return False

    def grow(self, n: int = 1) -> None:
        """``n`` more slots (``pool_grow``, autoscale)."""
        self.limit += max(0, int(n))

    def shrink(self, n: int = 1) -> None:
        """``n`` fewer slots, never below 0 (Celery's goes negative); running
        greenlets finish, the consumer starts no task beyond the new limit."""
        self.limit -= min(max(0, int(n)), self.limit)

    def restart(self) -> None:
        """Tasks run in this process: nothing to restart (as Celery's green pools)."""
        raise NotImplementedError(f"{type(self)} does not implement restart")

    def stop(self, wait: bool = True) -> None:
        if not self._started:
            return
        if wait:
            self.green.join_all()
        else:
            # Cold: nothing more is reported (as the prefork pool); the
            # consumer has returned the messages.
            for job in list(self._jobs.values()):
                job.handled = True
                self._disarm(job)
            self.green.kill_all(TaskKilled, COLD_KILL_GRACE)
        if self.watchdog is not None:
            self.watchdog.stop()

    # -- what runs in a task greenlet ----------------------------------------------

    def _run(self, job: Job) -> None:
        job.frame = sys._getframe()
        self._frames[job.frame] = job
        # Not ``job.greenlet``: a runtime whose hub is another thread (asyncio)
        # may start this before ``apply`` has stored the handle.
        me = self.green.current()
        self._current[me] = job
        outcome = Outcome(State.INTERNAL_ERROR)
        reraise: BaseException | None = None
        try:
            with self._backend_slot():
                outcome = self._run_task(job)
        except GreenletExit as exc:
            if not job.handled:  # not ours: the task (or a library) raised it
                outcome = self._internal_error(job, exc)
        except BaseException as exc:
            outcome = self._internal_error(job, exc)
            if not isinstance(exc, Exception):
                reraise = exc  # SystemExit, KeyboardInterrupt: as the solo pool does
        finally:
            self._disarm(job)
            self._frames.pop(job.frame, None)
            self._current.pop(me, None)
            job.frame = None
            self._jobs.pop(id(job), None)
            self._report(job, outcome)
        if reraise is not None:
            raise reraise

    def _run_task(self, job: Job) -> Outcome:
        task = self.runner.app.tasks[job.task_name]
        job.hard, job.soft = procproto.time_limits(
            job.message.timelimit, task, self.time_limit, self.soft_time_limit)
        self._arm(job)
        return self._runner.run(task, job.message)

    def _before_final_write(self) -> None:
        """Called in a task greenlet before its run writes SUCCESS/FAILURE/RETRY.

        From here on the run owns its outcome: the limits are disarmed. If
        the hard limit came first (a task that swallowed the kill and went
        on), the FAILURE recorded for it stays: the write is refused.
        """
        job = self._current.get(self.green.current())
        if job is None:
            return
        if job.handled:
            raise TaskKilled()
        job.final = True
        self._disarm(job)

    @contextmanager
    def _backend_slot(self) -> Iterator[None]:
        """Run with a result backend a finished greenlet left, and leave ours.

        ``app.backend`` lives in a ``threading.local`` (unless
        ``result_backend_thread_safe`` is set), which patching makes
        per-*greenlet*: every task would build a backend with a connection
        pool of its own, connect anew, and the runner would keep a result
        store for each. Celery's green pools build one per task; ours
        passes them on, so there are at most as many as tasks ever ran at
        once, each used by one greenlet at a time (like the threads pool's
        one per thread), and their connections are reused.
        """
        local = getattr(self.runner.app, "_local", None)
        if local is None:  # not a Celery app we know how to share with
            yield
            return
        if self._backends and getattr(local, "backend", None) is None:
            local.backend = self._backends.pop()
        try:
            yield
        finally:
            backend = getattr(local, "backend", None)
            if backend is not None:
                self._backends.append(backend)

    def _internal_error(self, job: Job, exc: BaseException) -> Outcome:
        message = job.message
        self.green.logger.critical("Task %s[%s] INTERNAL ERROR: %r", message.name, message.id, exc,
                        exc_info=(type(exc), exc, exc.__traceback__))
        return Outcome(State.INTERNAL_ERROR, exc, exception_repr=repr(exc))

    def _report(self, job: Job, outcome: Outcome) -> None:
        if job.handled:
            return
        job.handled = True
        self._call_on_done(job, outcome)

    def _call_on_done(self, job: Job, outcome: Outcome) -> None:
        try:
            job.on_done(outcome)
        except Exception:
            self.green.logger.critical("on_done callback failed", exc_info=True)

    # -- time limits (hub timers; callbacks run in the hub) ----------------------------

    def _arm(self, job: Job) -> None:
        if job.soft:
            self._set_timer(job, float(job.soft), self._on_soft)
        elif job.hard:
            self._set_timer(job, float(job.hard), self._on_hard)

    def _set_timer(self, job: Job, seconds: float, callback: Any) -> None:
        job.cancel_timer = self.green.call_later(max(0.0, seconds), callback, job)

    @staticmethod
    def _disarm(job: Job) -> None:
        cancel, job.cancel_timer = job.cancel_timer, None
        if cancel is not None:
            cancel()

    def _on_soft(self, job: Job) -> None:
        self._disarm(job)
        greenlet = job.greenlet
        if job.handled or job.final or greenlet is None or self.green.dead(greenlet):
            return
        soft_limit_exceeded(job.soft, job.message)
        if job.hard:
            # Before the soft kill: with eventlet the kill runs the task
            # greenlet at once, and it may finish before we come back.
            self._set_timer(job, max(0.0, float(job.hard) - float(job.soft)), self._on_hard)
        self.green.kill(greenlet, SoftTimeLimitExceeded())

    def _on_hard(self, job: Job) -> None:
        self._disarm(job)
        greenlet = job.greenlet
        if job.handled or job.final or greenlet is None or self.green.dead(greenlet):
            return
        job.handled = True  # the greenlet's own report is void from now on
        self.green.kill(greenlet, TaskKilled)
        self.green.spawn(self._record_hard_limit, job)

    def _record_hard_limit(self, job: Job) -> None:
        """After the killed greenlet unwound: what the prefork parent records."""
        greenlet = job.greenlet
        self.green.join(greenlet, HARD_KILL_GRACE)
        message = job.message
        if not self.green.dead(greenlet):
            self.green.logger.warning(
                "Task %s[%s] did not stop when killed at its hard time limit; it goes on "
                "outside the pool", message.name, message.id)
            self.green.forget(greenlet)
        try:
            with self._backend_slot():
                outcome = failures.hard_time_limit(
                    self.runner, self.runner.app.tasks[job.task_name], message, job.hard,
                    handler_line=False)
        except Exception as exc:
            self.green.logger.critical("Could not record a pool outcome: %r", exc,
                                       exc_info=True)
            outcome = Outcome(State.INTERNAL_ERROR, exc, exception_repr=repr(exc))
        self._call_on_done(job, outcome)

    def _finish_terminated(self, job: Job) -> None:
        """After a terminated greenlet unwound (or its grace ran out): report it."""
        greenlet = job.greenlet
        self.green.join(greenlet, HARD_KILL_GRACE)
        message = job.message
        if not self.green.dead(greenlet):
            self.green.logger.warning("Task %s[%s] did not stop when terminated; it goes "
                                      "on outside the pool", message.name, message.id)
        self.green.forget(greenlet)
        # A greenlet killed before it ran never reaches `_run`'s cleanup.
        self._jobs.pop(id(job), None)
        self._call_on_done(job, Outcome(State.REVOKED))

    # -- the watchdog's question ----------------------------------------------------

    def describe(self, frame: FrameType) -> str | None:
        """``Task name[id]`` if ``frame`` is the bottom frame of a task greenlet."""
        job = self._frames.get(frame)
        if job is None:
            return None
        return f"Task {job.message.name}[{job.message.id}]"
