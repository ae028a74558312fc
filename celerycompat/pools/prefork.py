"""The prefork pool (Celery's default): tasks run in forked child processes.

Parent side: the pool interface here, the supervisor thread that owns the
children in `celerycompat.pools.prefork_supervisor`. The child side is
`celerycompat.pools.child`, the messages and their framing
`celerycompat.pools.procproto`, and the outcomes the parent records for a
child that cannot (lost, killed at the hard limit) `celerycompat.pools.failures`.

::

    consumer (main thread)            supervisor thread                 children
    ----------------------            -----------------                 --------
    apply(name, msg, on_done) --> pending jobs --> idle child  ==job==>  run task,
                                      |                       <=accepted= store result
                                      |   time limits (soft: SIGUSR1,    <==done===
    on_done(Outcome) <----------------+    hard: store + TERM/KILL)
                                      |   EOF + waitpid: lost job ->
                                      |   WorkerLostError stored, child replaced

* ``-c N`` children are forked in `start` (in the main thread, after the app
  is loaded and before the consumer connects), each with one socket pair to
  the parent; with ``--pool-start-method spawn`` each is a fresh
  interpreter instead (`celerycompat.pools.spawned`), the rest the same.
  Replacements are started by the supervisor thread, which stays alive as
  long as any child (a child's parent-death signal follows the thread that
  started it).
* The supervisor thread owns every child socket, the job queue and the
  timers; ``apply`` only appends to the queue and wakes it through a pipe.
  It calls ``on_done`` for every job exactly once: with the child's Outcome,
  or with the outcome it recorded itself.
* ``apply`` takes up to ``limit`` jobs beyond the children (`queue_ahead`):
  a child reporting ``done`` gets the next one on the same supervisor turn.
  Warm shutdown and revokes take back those no child has taken (`withdraw`).
* A job is handed to a child that said ``up`` and has nothing to do; a child
  that dies before accepting a job gives it back to the queue (it never
  started), one that dies after is a lost worker (wire contract B9).
* Time limits start when the child accepts the job, as Celery's do. Soft:
  warning line, SIGUSR1 (``SoftTimeLimitExceeded`` raised in the task). Hard:
  the parent stores ``TimeLimitExceeded`` and sends SIGTERM, then SIGKILL
  after 0.1 s (billiard's ``_trywaitkill``); the child is replaced.
* Stop: warm waits for queued and running jobs, then asks each child to
  exit (``worker_process_shutdown`` runs there); cold sends SIGTERM, then
  SIGKILL after a second.
* Remote control, run on the supervisor thread (`_call`), which owns the
  children: ``revoke(terminate=True)`` (`terminate`) sends the signal to the
  child running the task; its exit is then neither logged nor a lost worker
  (the consumer announced REVOKED; billiard's ``terminate_job`` and
  ``_controlled_termination``), and it is replaced. ``pool_grow`` (`grow`)
  raises the number of children, forked on the next turn; ``pool_shrink``
  (`shrink`) asks idle children to exit (ValueError, billiard's, when fewer
  are idle than asked: those that are stop all the same); ``pool_restart``
  (`restart`) asks every child to exit once idle, and each is replaced by a
  fork of the (reloaded) parent.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

from celery import signals

from celerycompat.execution.outcome import Outcome, State
from celerycompat.pools import failures, procproto, spawned
from celerycompat.pools.base import OnDone
from celerycompat.pools.child import ChildConfig, child_main
from celerycompat.pools.prefork_records import Child, Job
from celerycompat.pools.prefork_supervisor import Supervisor
from celerycompat.protocol.message import TaskMessage


class PreforkPool(Supervisor):
    name = "celery.concurrency.prefork:TaskPool"
    runs_inline = False
    task_join_will_block = True

    def __init__(self, runner: Any, limit: int, *, hostname: str,
                 max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | None = None,
                 time_limit: Any = None, soft_time_limit: Any = None,
                 loglevel: int | None = None, logfile: str | None = None,
                 proc_alive_timeout: float | None = 4.0,
                 spawning: spawned.SpawnSpec | None = None) -> None:
        self.runner = runner
        #: ``--pool-start-method spawn``: what each child is started from
        #: (its ``child`` config is filled in per child); None: forked.
        self.spawning = spawning
        self.limit = max(0, int(limit))
        """The number of children kept (``-c``; ``pool_grow``/``shrink``, autoscale)."""
        self.initial_limit = self.limit
        """What ``inspect stats`` shows as ``max-concurrency``: Celery's prefork
        pool reports the size it was created with (``-c``, or the autoscale
        minimum), whatever grow/shrink/autoscale did since."""
        self.hostname = hostname
        self.max_tasks_per_child = max_tasks_per_child or None
        self.max_memory_per_child = max_memory_per_child or None
        self.time_limit = time_limit or None
        self.soft_time_limit = soft_time_limit or None
        self.loglevel = loglevel
        self.logfile = logfile
        self.proc_alive_timeout = proc_alive_timeout
        self._children: dict[int, Child] = {}
        self._pending: deque[Job] = deque()
        self._jobs = itertools.count()
        self._names = itertools.count(1)
        self._timers: list[tuple[float, int, str, Any]] = []
        self._timer_seq = itertools.count()
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None
        self._stop_mode: str | None = None
        self._cold_deadline: float | None = None
        self._respawn_at = 0.0
        self._next_reap = 0.0
        self._writes: dict[int, int] = {}
        """Jobs written per child index (``inspect stats`` ``writes``)."""
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        """Remote-control work for the supervisor thread (`_call`)."""

    # -- what inspect will need --------------------------------------------------

    @property
    def processes(self) -> list[int]:
        """Pids of the live children."""
        return [child.pid for child in list(self._children.values())]

    def workers(self) -> list[dict[str, Any]]:
        """Per child: pid, index, name and the task it runs (id, start time)."""
        out = []
        for child in list(self._children.values()):
            job = child.job
            running = job is not None and job.accepted and not job.handled
            out.append({
                "pid": child.pid, "index": child.index, "name": child.name,
                "task_id": job.message.id if running else None,
                "time_start": job.time_start if running else None,
            })
        return out

    def pid_for(self, task_id: str) -> int | None:
        """The child running ``task_id``, if one has accepted it."""
        for worker in self.workers():
            if worker["task_id"] == task_id:
                return worker["pid"]
        return None

    def info(self) -> dict[str, Any]:
        """The ``pool`` section of ``inspect stats``, in the shape of Celery's
        prefork pool (``TaskPool._get_info`` + ``AsynPool.human_write_stats``)."""
        children = list(self._children.values())
        writes = dict(self._writes)
        vals = list(writes.values())
        total = sum(vals)

        def per(v: int) -> str:
            return f"{(float(v) / total) if v else 0:.2f}"

        return {
            "implementation": self.name,
            "max-concurrency": self.initial_limit,
            "processes": [child.pid for child in children],
            "max-tasks-per-child": self.max_tasks_per_child or "N/A",
            # Celery's consumer runs an event loop, so its pool has no put-locks.
            "put-guarded-by-semaphore": False,
            "timeouts": [self.soft_time_limit or 0, self.time_limit or 0],
            "writes": {
                "total": total,
                "avg": per(total / len(writes)) if total else per(0),
                "all": ", ".join(per(v) for v in vals),
                "raw": ", ".join(map(str, vals)),
                "strategy": "fair",
                # Celery counts a process's queue once the process is up.
                "inqueues": {"total": sum(1 for child in children if child.up), "active": 0},
            },
        }

    # -- the Pool interface --------------------------------------------------------

    def start(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        if self.spawning is not None:
            spawned.announce()
        for index in range(self.limit):
            self._spawn(index)
        self._thread = threading.Thread(target=self._supervise, name="PreforkSupervisor",
                                        daemon=True)
        self._thread.start()

    def apply(self, task_name: str, message: TaskMessage, on_done: OnDone) -> None:
        job_no = next(self._jobs)
        try:
            payload = procproto.dumps(("job", job_no, task_name, message))
        except Exception as exc:
            error = exc
            self._report(on_done, lambda: failures.refused(
                self.runner, self.runner.app.tasks[task_name], message, error))
            return
        self._pending.append(Job(job_no, task_name, message, on_done, payload))
        self._wake()

    @property
    def queue_ahead(self) -> int:
        """As many jobs again as there are children wait in the parent, so a
        child that reports ``done`` is sent its next job on that same turn of
        the supervisor, not after the consumer has settled the last one and
        handed another over (a thread hop each way, most of a no-op task's
        time). Only an idle child takes a job (billiard's fair strategy)."""
        return self.limit

    def withdraw(self, messages: list[TaskMessage]) -> list[TaskMessage]:
        wanted = {id(message) for message in messages}

        def take() -> list[TaskMessage]:
            taken = [job for job in self._pending
                     if id(job.message) in wanted and not job.handled]
            for job in taken:
                self._pending.remove(job)
                job.handled = True
            return [job.message for job in taken]

        return self._call(take, default=[])

    def terminate(self, task_id: str, signum: int) -> bool:
        """Send ``signum`` to the child running ``task_id`` (billiard's ``terminate_job``).

        Its exit is then not logged and not a lost worker; the job is
        reported as ``State.REVOKED`` when the child is gone (or with the
        child's own outcome if it finishes anyway: a signal it ignores, or
        one that came just too late), and the child is replaced.
        """
        def kill() -> bool:
            for job in self._pending:
                if job.message.id == task_id and not job.handled:
                    # Not handed to a child yet: it never starts.
                    self._pending.remove(job)
                    job.handled = True
                    self._report(job.on_done, lambda: Outcome(State.REVOKED))
                    return True
            for child in self._children.values():
                job = child.job
                if job is None or job.handled or job.message.id != task_id:
                    continue
                job.term_signal = signum
                if job.accepted:
                    self._signal_terminated(child, job)
                # else: when the child accepts it (Celery's ``_terminate_on_ack``).
                return True
            return False

        return bool(self._call(kill, default=False))

    def grow(self, n: int = 1) -> None:
        """``n`` more children, forked on the supervisor's next turn (billiard's ``grow``)."""
        self.limit += max(0, int(n))
        self._wake()

    def shrink(self, n: int = 1) -> None:
        """Ask up to ``n`` idle children to exit (billiard's ``shrink``).

        Raises billiard's ValueError when fewer than ``n`` are idle; the idle
        ones were stopped all the same (and ``limit`` lowered for each).
        """
        def stop_idle() -> int:
            stopped = 0
            for child in sorted(self._children.values(), key=lambda c: c.index):
                if stopped >= n:
                    break
                # Idle, or still starting: no job of its own (billiard's "inactive").
                if child.job is None and not (child.last or child.eof or child.stop_sent):
                    self._send_stop(child)
                    self.limit -= 1
                    stopped += 1
            return stopped

        n = max(0, int(n))
        if self._call(stop_idle, default=0) < n:
            raise ValueError("Can't shrink pool. All processes busy!")

    def restart(self) -> None:
        """``pool_restart``: every child exits once idle and is replaced by a fork
        of this (reloaded) process, as billiard's restart sentinel does."""
        def retire_all() -> None:
            for child in self._children.values():
                child.retire = True
            self._retire_idle()

        self._call(retire_all)

    def stop(self, wait: bool = True) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stop_mode = "warm" if wait else "cold"
        self._wake()
        thread.join()
        self._thread = None
        if self._selector is not None:
            self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- children ---------------------------------------------------------------

    def _free_index(self) -> int:
        used = {child.index for child in self._children.values()}
        return next(i for i in itertools.count() if i not in used)

    def _spawn(self, index: int) -> Child:
        """Start the child for slot ``index``: forked, or a fresh interpreter
        with ``--pool-start-method spawn`` (pools/spawned.py)."""
        before_create = getattr(signals, "worker_before_create_process", None)
        if before_create is not None:  # Celery >= 5.3 has the signal
            before_create.send(sender=self)
        gc.collect()  # as Celery does before each fork (Celery issue #2927)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        prefix = "ForkPoolWorker" if self.spawning is None else spawned.NAME_PREFIX
        name = f"{prefix}-{next(self._names)}"
        config = ChildConfig(
            hostname=self.hostname, index=index, name=name,
            max_tasks=self.max_tasks_per_child, max_memory_kib=self.max_memory_per_child,
            loglevel=self.loglevel, logfile=self.logfile,
        )
        try:
            if self.spawning is None:
                pid = self._fork(config, parent_sock, child_sock)
            else:
                spec = dataclasses.replace(
                    self.spawning, child=config,
                    conf_changes=spawned.conf_changes(self.runner.app))
                pid = spawned.start(spec, child_sock, parent_sock)
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        child = Child(pid, index, name, parent_sock, time.monotonic())
        self._children[pid] = child
        assert self._selector is not None
        self._selector.register(parent_sock, selectors.EVENT_READ, child)
        return child

    def _fork(self, config: ChildConfig, parent_sock: socket.socket,
              child_sock: socket.socket) -> int:
        """Fork the child; returns its pid (the child runs `child_main`)."""
        inherited = [parent_sock.fileno(), self._wake_r, self._wake_w]
        inherited += [child.sock.fileno() for child in self._children.values()]
        assert self._selector is not None
        selector_fd = getattr(self._selector, "fileno", lambda: -1)()
        if selector_fd >= 0:
            inherited.append(selector_fd)
        # No thread may be inside a log handler while we fork: the child
        # would inherit the stream's buffer lock held by a thread it does
        # not have. (logging itself re-creates the handler locks in the child.)
        handlers = _logging_handlers()
        for handler in handlers:
            handler.acquire()
        try:
            pid = os.fork()
        except BaseException:
            for handler in handlers:
                handler.release()
            raise
        if pid == 0:  # the child: never returns
            child_main(child_sock, self.runner, config, inherited)
        for handler in handlers:
            handler.release()
        return pid


def _logging_handlers() -> list[logging.Handler]:
    """Every handler of every configured logger, once each, in a stable order."""
    seen: dict[int, logging.Handler] = {}
    loggers = [logging.getLogger()]
    loggers += [obj for obj in list(logging.Logger.manager.loggerDict.values())
                if isinstance(obj, logging.Logger)]
    for lg in loggers:
        for handler in lg.handlers:
            seen.setdefault(id(handler), handler)
    return list(seen.values())
