"""The prefork pool (Celery's default): tasks run in forked child processes.

Parent side. The child side is `celerycompat.pools.child`, the messages and
their framing `celerycompat.pools.procproto`, and the outcomes the parent
records for a child that cannot (lost, killed at the hard limit)
`celerycompat.pools.failures`.

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
  the parent. Replacements are forked by the supervisor thread, which stays
  alive as long as any child (a child's parent-death signal follows the
  thread that forked it).
* The supervisor thread owns every child socket, the job queue and the
  timers; ``apply`` only appends to the queue and wakes it through a pipe.
  It calls ``on_done`` for every job exactly once: with the child's Outcome,
  or with the outcome it recorded itself.
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

import gc
import heapq
import itertools
import logging
import os
import selectors
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Callable

from billiard.exceptions import WorkerLostError
from celery import signals

from celerycompat.backends.group_commit import Write
from celerycompat.execution.outcome import Outcome, State
from celerycompat.pools import failures, procproto
from celerycompat.pools.base import OnDone
from celerycompat.pools.child import ChildConfig, child_main
from celerycompat.protocol.message import TaskMessage

logger = logging.getLogger("celery.concurrency.prefork")
request_logger = logging.getLogger("celery.worker.request")
#: billiard logs pool process exits here (Celery's app.log configures it).
billiard_logger = logging.getLogger("multiprocessing")

#: billiard's ``_trywaitkill``: SIGTERM, then SIGKILL if still alive after this.
HARD_KILL_GRACE = 0.1
#: Cold shutdown: SIGTERM, then SIGKILL after this.
COLD_KILL_GRACE = 1.0
#: A child that dies before saying ``up`` delays the next fork this long.
RESPAWN_BACKOFF = 1.0
#: How often every child is polled with ``waitpid`` (deaths without EOF).
REAP_INTERVAL = 0.5
#: How long a remote-control call waits for the supervisor thread.
CALL_TIMEOUT = 10.0


@dataclass(eq=False)
class Job:
    no: int
    task_name: str
    message: TaskMessage
    on_done: OnDone
    payload: bytes
    child: Child | None = None
    accepted: bool = False
    time_start: float | None = None
    hard: Any = None
    soft: Any = None
    handled: bool = False
    """``on_done`` was called (by the child's report or by the parent)."""
    term_signal: int | None = None
    """``revoke(terminate=True)``: the signal for its child (sent at once, or
    when the child accepts the job). No time limit, no lost worker then."""

    @property
    def terminated(self) -> bool:
        return self.term_signal is not None


@dataclass(eq=False)
class Child:
    pid: int
    index: int
    name: str
    sock: socket.socket
    started: float
    reader: procproto.FrameReader = field(default_factory=procproto.FrameReader)
    up: bool = False
    job: Job | None = None
    last: bool = False
    """It said its last job was its last (max tasks / memory): no more jobs."""
    eof: bool = False
    controlled: bool = False
    """We are stopping it: its exit is not an error."""
    stop_sent: bool = False
    signalled: bool = False
    """``terminate`` signalled it: its exit is not an error (until it takes a new job)."""
    retire: bool = False
    """``pool_restart``: it is asked to exit once idle, and replaced."""
    writing: dict[int, tuple[Job, Write]] = field(default_factory=dict)
    """Jobs it reported done whose SUCCESS write it has not confirmed yet."""

    @property
    def idle(self) -> bool:
        return self.up and self.job is None and not (
            self.last or self.eof or self.stop_sent or self.retire)


class PreforkPool:
    name = "celery.concurrency.prefork:TaskPool"
    runs_inline = False
    task_join_will_block = True

    def __init__(self, runner: Any, limit: int, *, hostname: str,
                 max_tasks_per_child: int | None = None,
                 max_memory_per_child: int | None = None,
                 time_limit: Any = None, soft_time_limit: Any = None,
                 loglevel: int | None = None, logfile: str | None = None,
                 proc_alive_timeout: float | None = 4.0) -> None:
        self.runner = runner
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
        before_create = getattr(signals, "worker_before_create_process", None)
        if before_create is not None:  # Celery >= 5.3 has the signal
            before_create.send(sender=self)
        gc.collect()  # as Celery does before each fork (Celery issue #2927)
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        name = f"ForkPoolWorker-{next(self._names)}"
        config = ChildConfig(
            hostname=self.hostname, index=index, name=name,
            max_tasks=self.max_tasks_per_child, max_memory_kib=self.max_memory_per_child,
            loglevel=self.loglevel, logfile=self.logfile,
        )
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
        child_sock.close()
        child = Child(pid, index, name, parent_sock, time.monotonic())
        self._children[pid] = child
        self._selector.register(parent_sock, selectors.EVENT_READ, child)
        return child

    # -- the supervisor thread ---------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or we are closing)

    def _supervise(self) -> None:
        try:
            while not self._finished():
                self._turn()
        except BaseException:
            logger.critical("prefork pool supervisor failed; killing the pool processes",
                            exc_info=True)
            for child in list(self._children.values()):
                _kill(child.pid, signal.SIGKILL)
            raise
        finally:
            # Control requests that came in while the pool stopped: answer
            # them here (there are no children left to act on).
            self._run_calls()

    def _call(self, fn: Callable[[], Any], default: Any = None) -> Any:
        """Run ``fn`` on the supervisor thread (which owns the children) and
        return its result; at once if there is no supervisor (not started,
        stopped). ``default`` if the supervisor does not take the call in
        time; the call is then withdrawn, never run later: a ``kill`` that
        ran after its caller reported "not terminated" would end a task the
        consumer still counts as running. A call the supervisor has already
        begun is waited for (they are short and never block)."""
        thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            return fn()
        future: Future = Future()
        self._calls.append((fn, future))
        self._wake()
        try:
            return future.result(CALL_TIMEOUT)
        except FutureTimeout:  # the builtin TimeoutError only from Python 3.11
            if not future.cancel():  # running: it is answering now
                try:
                    return future.result(CALL_TIMEOUT)
                except FutureTimeout:
                    pass
            logger.error("The prefork pool supervisor did not answer a control request "
                         "in %gs; the request was withdrawn", CALL_TIMEOUT)
            return default

    def _run_calls(self) -> None:
        while self._calls:
            fn, future = self._calls.popleft()
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up waiting (`_call`)
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _turn(self) -> None:
        assert self._selector is not None
        for key, _ in self._selector.select(self._timeout()):
            if key.data is None:
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            else:
                self._read(key.data)
        self._run_calls()
        now = time.monotonic()
        self._fire_timers(now)
        self._reap(now)
        if self._stop_mode is None or (self._stop_mode == "warm" and self._pending):
            self._maintain(now)
        elif self._stop_mode == "cold":
            self._stop_cold(now)
        self._dispatch()
        self._retire_idle()
        if self._stop_mode == "warm":
            self._stop_warm()

    def _timeout(self) -> float:
        timeout = REAP_INTERVAL
        now = time.monotonic()
        if self._timers:
            timeout = min(timeout, self._timers[0][0] - now)
        if any(child.eof for child in self._children.values()):
            timeout = min(timeout, 0.01)
        if self._stop_mode is None and len(self._children) < self.limit:
            timeout = min(timeout, self._respawn_at - now)
        return max(0.0, timeout)

    def _finished(self) -> bool:
        return self._stop_mode is not None and not self._children and (
            self._stop_mode == "cold" or not self._pending)

    def _read(self, child: Child) -> None:
        try:
            data = child.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            self._on_eof(child)
            return
        for message in child.reader.feed(data):
            self._on_message(child, message)

    def _on_eof(self, child: Child) -> None:
        if not child.eof:
            child.eof = True
            assert self._selector is not None
            try:
                self._selector.unregister(child.sock)
            except (KeyError, ValueError):
                pass

    def _on_message(self, child: Child, message: tuple) -> None:
        kind = message[0]
        if kind == "up":
            child.up = True
        elif kind == "accepted":
            job = child.job
            if job is None or job.no != message[1]:
                return
            job.accepted = True
            child.signalled = False  # a new job: a terminate signal did not end it
            job.payload = b""  # it can no longer be given to another child
            if job.terminated:
                self._signal_terminated(child, job)
                return
            job.time_start = time.time()
            task = self.runner.app.tasks.get(job.task_name)
            job.hard, job.soft = procproto.time_limits(
                job.message.timelimit, task, self.time_limit, self.soft_time_limit)
            now = time.monotonic()
            if job.soft:
                self._add_timer(now + float(job.soft), "soft", job)
            elif job.hard:
                self._add_timer(now + float(job.hard), "hard", job)
        elif kind == "done":
            _, job_no, outcome, last, deferred = message
            job = child.job
            child.job = None
            child.last = child.last or bool(last)
            if job is not None and job.no == job_no and not job.handled:
                job.handled = True
                if deferred:
                    # The child stores the result in the background (group
                    # commit): the consumer settles once it says "written".
                    outcome.durable = Write()
                    child.writing[job_no] = (job, outcome.durable)
                self._report(job.on_done, lambda: outcome)
        elif kind == "written":
            _, job_no, error = message
            pending = child.writing.pop(job_no, None)
            if pending is not None:
                pending[1].finish(error)
        elif kind == "exit":
            _, job_no, code = message
            job = child.job
            child.job = None
            child.last = True
            if job is not None and job.no == job_no and not job.handled:
                job.handled = True
                text = procproto.self_exit_text(code)
                self._report(job.on_done, lambda: self._lost(job, text))

    def _lost(self, job: Job, text: str) -> Outcome:
        task = self.runner.app.tasks[job.task_name]
        return failures.worker_lost(self.runner, task, job.message, text)

    def _report(self, on_done: OnDone, make: Any) -> None:
        """``on_done(make())``; if recording the outcome fails, still free the slot."""
        try:
            outcome = make()
        except Exception as exc:
            logger.critical("Could not record a pool outcome: %r", exc, exc_info=True)
            outcome = Outcome(State.INTERNAL_ERROR, exc, exception_repr=repr(exc))
        try:
            on_done(outcome)
        except Exception:
            logger.critical("on_done callback failed", exc_info=True)

    # -- timers (time limits, kill grace) ----------------------------------------

    def _add_timer(self, when: float, kind: str, what: Any) -> None:
        heapq.heappush(self._timers, (when, next(self._timer_seq), kind, what))

    def _fire_timers(self, now: float) -> None:
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, what = heapq.heappop(self._timers)
            if kind == "kill":
                child = what
                if child.pid in self._children:
                    _kill(child.pid, signal.SIGKILL)
                continue
            job = what
            child = job.child
            if job.handled or job.terminated or child is None or child.job is not job:
                continue
            if kind == "soft":
                request_logger.warning("Soft time limit (%ss) exceeded for %s[%s]",
                                       job.soft, job.message.name, job.message.id)
                _kill(child.pid, signal.SIGUSR1)
                if job.hard:
                    delay = max(0.0, float(job.hard) - float(job.soft))
                    self._add_timer(now + delay, "hard", job)
            elif kind == "hard":
                self._hard_limit(job, child, now)

    @staticmethod
    def _signal_terminated(child: Child, job: Job) -> None:
        """Send ``revoke(terminate=True)``'s signal to the child running ``job``."""
        child.signalled = True
        assert job.term_signal is not None
        _kill(child.pid, job.term_signal)

    def _hard_limit(self, job: Job, child: Child, now: float) -> None:
        job.handled = True
        child.last = True  # it is being killed: nothing more goes to it
        task = self.runner.app.tasks[job.task_name]
        self._report(job.on_done, lambda: failures.hard_time_limit(
            self.runner, task, job.message, job.hard))
        _kill(child.pid, signal.SIGTERM)
        self._add_timer(time.monotonic() + HARD_KILL_GRACE, "kill", child)

    # -- exits and replacements ------------------------------------------------

    def _reap(self, now: float) -> None:
        periodic = now >= self._next_reap
        if periodic:
            self._next_reap = now + REAP_INTERVAL
        for child in list(self._children.values()):
            if not (child.eof or periodic):
                continue
            if (periodic and not child.up and self.proc_alive_timeout
                    and now - child.started > self.proc_alive_timeout
                    and not child.controlled):
                logger.error("Timed out waiting for UP message from %r", child.name)
                _kill(child.pid, signal.SIGKILL)
            try:
                pid, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = child.pid, 0
            if pid == 0:
                continue
            self._on_exit(child, procproto.exitcode_from_status(status), now)

    def _on_exit(self, child: Child, exitcode: int, now: float) -> None:
        self._read_rest(child)
        self._on_eof(child)
        child.sock.close()
        self._lose_writes(child, exitcode)
        self._children.pop(child.pid, None)
        if exitcode not in (0, procproto.EX_RECYCLE) and not (child.controlled
                                                              or child.signalled):
            billiard_logger.error("Process %r pid:%r exited with %r", child.name, child.pid,
                                  procproto.human_status(exitcode))
        if not child.up and self._stop_mode is None:
            self._respawn_at = now + RESPAWN_BACKOFF
        job = child.job
        child.job = None
        if job is None or job.handled:
            return
        if self._stop_mode == "cold":
            job.handled = True  # killed on purpose; the consumer no longer listens
            return
        if not job.accepted and not job.terminated:
            job.child = None
            self._pending.appendleft(job)  # it never started: give it to another child
            return
        job.handled = True
        if job.terminated:
            # Killed by ``revoke(terminate=True)``: REVOKED is announced already.
            self._report(job.on_done, lambda: Outcome(State.REVOKED))
            return
        text = procproto.worker_lost_text(exitcode, job.no)
        self._report(job.on_done, lambda: self._lost(job, text))

    def _read_rest(self, child: Child) -> None:
        """What an exited child sent that the selector has not read yet (a
        periodic reap can come first): its last ``written`` reports."""
        if child.eof:
            return
        try:
            child.sock.setblocking(False)
            while True:
                data = child.sock.recv(1 << 16)
                if not data:
                    return
                for message in child.reader.feed(data):
                    self._on_message(child, message)
        except OSError:  # nothing more (BlockingIOError) or a broken socket
            return

    def _lose_writes(self, child: Child, exitcode: int) -> None:
        """Writes the child never confirmed: settled as a lost worker's job.

        `failures.worker_lost` finds a SUCCESS that did land (then the write
        counts as done) and otherwise stores WorkerLostError, as Celery does
        for a child that dies before its result is stored.
        """
        writing, child.writing = child.writing, {}
        for job, write in writing.values():
            text = procproto.worker_lost_text(exitcode, job.no)
            lost: list[Outcome] = []
            self._report(lost.append, lambda job=job, text=text: self._lost(job, text))
            if lost and lost[0].state is State.SUCCESS:
                write.finish()
            else:
                write.finish(WorkerLostError(text))

    def _maintain(self, now: float) -> None:
        while len(self._children) < self.limit and now >= self._respawn_at:
            try:
                self._spawn(self._free_index())
            except OSError as exc:  # EAGAIN, ENOMEM: try again later
                logger.error("Could not start a pool process: %r", exc)
                self._respawn_at = now + RESPAWN_BACKOFF

    def _dispatch(self) -> None:
        if not self._pending:
            return
        for child in sorted(self._children.values(), key=lambda c: c.index):
            if not self._pending:
                return
            if not child.idle:
                continue
            job = self._pending.popleft()
            child.job, job.child = job, child
            try:
                child.sock.sendall(job.payload)
            except OSError:
                child.job, job.child = None, None
                self._pending.appendleft(job)
                self._on_eof(child)
                continue
            self._writes[child.index] = self._writes.get(child.index, 0) + 1

    # -- stopping ---------------------------------------------------------------

    def _stop_warm(self) -> None:
        if self._pending or any(child.job is not None for child in self._children.values()):
            return
        for child in list(self._children.values()):
            if child.stop_sent or child.eof:
                continue
            self._send_stop(child)

    def _retire_idle(self) -> None:
        """``pool_restart``: children marked to retire leave once they have no job."""
        for child in list(self._children.values()):
            if child.retire and child.up and child.job is None and not (
                    child.stop_sent or child.eof):
                self._send_stop(child)

    def _send_stop(self, child: Child) -> None:
        """Ask ``child`` to exit cleanly (``worker_process_shutdown`` runs there)."""
        child.stop_sent = child.controlled = True
        try:
            child.sock.sendall(procproto.dumps(("stop",)))
        except OSError:
            self._on_eof(child)

    def _stop_cold(self, now: float) -> None:
        if self._cold_deadline is None:
            self._cold_deadline = now + COLD_KILL_GRACE
            for child in self._children.values():
                child.controlled = True
                _kill(child.pid, signal.SIGTERM)
        elif now >= self._cold_deadline:
            for child in self._children.values():
                _kill(child.pid, signal.SIGKILL)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


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
