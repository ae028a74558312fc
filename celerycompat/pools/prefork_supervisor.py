"""The prefork pool's supervisor thread: the children's side of the parent.

One thread owns every child socket, the job queue, the timers and the
children's lives (see the diagram in celerycompat/pools/prefork.py): each
turn it runs the remote-control calls it was given (`_call`), reads what the
children say (``up``, ``accepted``, ``done``, ``written``, ``last``), fires
due timers (soft and hard time limits, kill graces), reaps exited children
(a job lost with its child becomes ``WorkerLostError``; a child's unconfirmed
SUCCESS writes are settled as lost), forks replacements, hands pending jobs
to idle children, and carries out warm and cold stops. ``on_done`` is
called for every job exactly once, from here.

These are `PreforkPool`'s methods (a mixin); what they use of the pool is
listed on `Supervisor`. `Job` and `Child` are the supervisor's records.
"""

from __future__ import annotations

import heapq
import logging
import os
import selectors
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, Callable

from billiard.exceptions import WorkerLostError

from celerycompat.backends import riding_acks
from celerycompat.backends.group_commit import Write
from celerycompat.execution.outcome import Outcome, State
from celerycompat.pools import failures, procproto
from celerycompat.pools.base import OnDone, soft_limit_exceeded
from celerycompat.pools.prefork_records import Child, Job

logger = logging.getLogger("celery.concurrency.prefork")
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


class Supervisor:
    """`PreforkPool`'s supervisor thread (module docstring).

    What it uses of the pool: ``runner``, ``limit``, ``time_limit``,
    ``soft_time_limit``, ``proc_alive_timeout``, the state made in its
    ``__init__`` (``_children``, ``_pending``, ``_timers``, ``_timer_seq``,
    ``_selector``, ``_wake_r``/``_wake_w``, ``_thread``, ``_stop_mode``,
    ``_cold_deadline``, ``_respawn_at``, ``_next_reap``, ``_writes``,
    ``_calls``), and ``_spawn`` / ``_free_index`` to fork a child.
    """

    runner: Any
    limit: int
    time_limit: Any
    soft_time_limit: Any
    proc_alive_timeout: float | None
    _children: dict[int, Child]
    _pending: deque[Job]
    _timers: list[tuple[float, int, str, Any]]
    _timer_seq: Any
    _selector: selectors.BaseSelector | None
    _wake_r: int
    _wake_w: int
    _thread: threading.Thread | None
    _stop_mode: str | None
    _cold_deadline: float | None
    _respawn_at: float
    _next_reap: float
    _writes: dict[int, int]
    _calls: deque[tuple[Callable[[], Any], Future]]

    if TYPE_CHECKING:  # the pool's, used here
        def _spawn(self, index: int) -> Child:
            ...

        def _free_index(self) -> int:
            ...

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
                self._report(job.on_done, lambda: outcome, child)
        elif kind == "ack":
            riding_acks.ack_due(message[1])  # to the consumer (riding_acks.py)
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
                self._report(job.on_done, lambda: self._lost(job, text), child)

    def _lost(self, job: Job, text: str) -> Outcome:
        task = self.runner.app.tasks[job.task_name]
        return failures.worker_lost(self.runner, task, job.message, text)

    def _report(self, on_done: OnDone, make: Any, child: Child | None = None) -> None:
        """``on_done(make())``; if recording the outcome fails, still free the slot.

        ``child``: the one that ran the job (``Outcome.pid``).
        """
        try:
            outcome = make()
        except Exception as exc:
            logger.critical("Could not record a pool outcome: %r", exc, exc_info=True)
            outcome = Outcome(State.INTERNAL_ERROR, exc, exception_repr=repr(exc))
        if child is not None:
            outcome.pid = child.pid
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
                soft_limit_exceeded(job.soft, job.message)
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
            self.runner, task, job.message, job.hard), child)
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
            self._report(job.on_done, lambda: Outcome(State.REVOKED), child)
            return
        text = procproto.worker_lost_text(exitcode, job.no)
        self._report(job.on_done, lambda: self._lost(job, text), child)

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
