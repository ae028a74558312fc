"""The child side of the prefork pool: one forked process running tasks.

`child_main` is called in the new process right after ``os.fork()`` and
never returns: it ends with ``os._exit``. It does what Celery's
``process_initializer`` and billiard's ``Worker`` do in a pool process,
in the same order where a project can observe it:

1. become a pool process: the name ``ForkPoolWorker-N`` (log lines), the
   after-fork hooks kombu/Celery registered (fresh broker connection pools),
   stdin on ``/dev/null``, parent-death signal SIGKILL;
2. signals (wire contract G8): SIGINT ignored, TERM/HUP/TTIN/TTOU/USR1 reset,
   then billiard's terminate handler on HUP/QUIT/TERM (raise ``SystemExit``
   so ``finally`` blocks run; a second one exits at once) and the soft time
   limit handler on SIGUSR1 (``SoftTimeLimitExceeded`` inside the task);
3. ``app.loader.init_worker()``/``init_worker_process()``, logging again if
   the log file name has ``%i``, the app made current, Celery's worker state
   reset, ``worker_process_init`` (sender = nodename; the Django fixup
   closes the inherited database connections on it);
4. say ``up``, then run jobs with this process's own `TaskRunner` (results
   are written from here, as Celery's children write them) until told to
   stop, ``--max-tasks-per-child`` or ``--max-memory-per-child`` is reached,
   or a terminate signal arrives. A SUCCESS write may be deferred (group
   commit, backends/group_commit.py): the child says ``done`` at once, takes
   its next job, and says ``written`` once the write is stored; before it
   exits it waits for every write still going;
5. ``worker_process_shutdown(sender=nodename, pid, exitcode)`` and exit.

The messages are in `celerycompat.pools.procproto`.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from billiard.exceptions import SoftTimeLimitExceeded

from celerycompat.backends import group_commit, riding_acks
from celerycompat.celery_release import process_init_sender
from celerycompat.execution import coroutines
from celerycompat.execution.context import own_request_class
from celerycompat.execution.outcome import Outcome, State
from celerycompat.pools import procproto

logger = logging.getLogger("celery.worker.request")
#: billiard logs through the "multiprocessing" logger, which Celery's app.log configures.
billiard_logger = logging.getLogger("multiprocessing")

#: Seconds an exiting child waits for its deferred result writes.
FLUSH_TIMEOUT = 10.0

MAXMEM_USED_FMT = "child process exiting after exceeding memory limit ({0}KiB / {1}KiB)\n"

#: Signals Celery resets to their default in a pool process (prefork.py).
WORKER_SIGRESET = ("SIGTERM", "SIGHUP", "SIGTTIN", "SIGTTOU", "SIGUSR1")
#: billiard's ``TERMSIGS_DEFAULT``: these raise SystemExit in a pool process.
TERMSIGS = ("SIGHUP", "SIGQUIT", "SIGTERM", "SIGUSR1")


@dataclass(frozen=True)
class ChildConfig:
    """What a child needs besides the runner, fixed when the pool is built."""

    hostname: str
    index: int
    """0-based slot index (billiard's ``Process.index``; ``%i`` in log file names)."""
    name: str
    """``ForkPoolWorker-N``."""
    max_tasks: int | None = None
    max_memory_kib: int | None = None
    loglevel: int | None = None
    logfile: str | None = None
    """The ``--logfile`` template as given (``%i`` still in it)."""
    group_commit: bool = True
    """Defer SUCCESS writes to a writer thread in the child (see `_serve`)."""


# Process-wide state of the child, read by the signal handlers.
_terminating = False
_in_task = False
#: The code of the last ``sys.exit()`` call (billiard patches sys.exit the same way).
_sys_exit_code: list = [None]


def _patch_sys_exit() -> None:
    real_exit = sys.exit

    def exit(status: Any = None) -> None:  # noqa: A001 - it replaces sys.exit
        _sys_exit_code[0] = status
        real_exit(status)

    sys.exit = exit


def _on_terminate(signum: int, frame: Any) -> None:
    """billiard.common._shutdown_cleanup: leave through SystemExit, once."""
    global _terminating
    if _terminating:
        os._exit(procproto.EX_SOFTWARE)
    try:
        signal.signal(signum, signal.SIG_DFL)
    except (OSError, ValueError):
        pass
    _terminating = True
    leave = SystemExit(-(256 - signum))
    # An ``async def`` task: cancelled at its await, its ``finally`` run, then
    # the same exit (raised here, SystemExit would stop its loop, not it).
    if _in_task and coroutines.deliver(threading.get_ident(), leave, cancel=True):
        return
    sys.exit(leave.code)


def _on_soft_timeout(signum: int, frame: Any) -> None:
    """SIGUSR1 from the parent at the soft time limit: raise inside the task.

    Unlike billiard we ignore it between tasks (a late signal would otherwise
    break the protocol code that runs between two tasks).
    """
    if _in_task and not coroutines.deliver(threading.get_ident(), SoftTimeLimitExceeded,
                                           cancel=False):
        raise SoftTimeLimitExceeded()


def _setsignal(name: str, handler: Any) -> None:
    num = getattr(signal, name, None)
    if num is None:
        return
    try:
        signal.signal(num, handler)
    except (OSError, ValueError, RuntimeError):
        pass


def install_signals() -> None:
    """The child's signal dispositions, as Celery + billiard leave them (G8)."""
    remap = os.environ.get("REMAP_SIGTERM")
    for name in WORKER_SIGRESET:
        _setsignal(name, signal.SIG_DFL)
    _setsignal("SIGINT", signal.SIG_IGN)
    if remap:
        _setsignal("SIGTERM", signal.SIG_IGN)
    for name in TERMSIGS:
        num = getattr(signal, name, None)
        if num is None:
            continue
        current = signal.getsignal(num)
        forced = remap and name == "SIGQUIT"
        if forced or (current is not None and current != signal.SIG_IGN):
            _setsignal(name, _on_terminate)
    _setsignal("SIGUSR1", _on_soft_timeout)
    _setsignal("SIGINT", signal.SIG_IGN)


def _become_pool_process(config: ChildConfig) -> None:
    """Name, after-fork hooks, stdin, parent-death signal."""
    import multiprocessing

    for current in _current_processes(multiprocessing):
        try:
            current.name = config.name
            current.index = config.index
        except Exception:  # a read-only stand-in; the name is cosmetic
            pass
    # kombu and Celery register their after-fork hooks with billiard's
    # registry (it is what a billiard child runs after fork): the app's
    # broker connection pool and producer pool are dropped there, so this
    # process opens its own connections instead of sharing the parent's.
    try:
        from billiard import util as billiard_util
        billiard_util._run_after_forkers()
    except Exception:
        logger.debug("billiard after-fork hooks failed", exc_info=True)
    try:
        from multiprocessing import util as mp_util
        mp_util._run_after_forkers()
    except Exception:
        logger.debug("multiprocessing after-fork hooks failed", exc_info=True)
    try:
        sys.stdin.close()
        sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the process
    except (OSError, ValueError):
        pass
    from celery import platforms

    platforms.set_pdeathsig("SIGKILL")
    platforms.set_process_title(f"celeryd: {config.hostname}:{config.name}")


def _current_processes(multiprocessing: Any) -> list:
    found = [multiprocessing.current_process()]
    try:
        from billiard import process as billiard_process
        found.append(billiard_process.current_process())
    except Exception:
        pass
    return found


def _init_app(app: Any, config: ChildConfig) -> None:
    """What ``celery.concurrency.prefork.process_initializer`` does after signals."""
    from celery import signals
    from celery._state import _set_task_join_will_block, set_default_app

    _set_task_join_will_block(True)
    app.loader.init_worker()
    app.loader.init_worker_process()
    logfile = config.logfile
    if logfile and "%i" in logfile.lower():
        # The file name differs per child: set logging up again for it, and
        # print() into it when the worker redirected its own (Celery's
        # app.log.redirect_stdouts leaves CELERY_LOG_REDIRECT in the
        # environment for its children). A forked child's stdout already
        # goes to the log; a spawned one's is the terminal until this.
        app.log.already_setup = False
        app.log.setup(config.loglevel, logfile,
                      bool(os.environ.get("CELERY_LOG_REDIRECT", False)),
                      str(os.environ.get("CELERY_LOG_REDIRECT_LEVEL")),
                      hostname=config.hostname)
    app.set_current()
    set_default_app(app)
    app.finalize()
    try:
        from celery.worker import state as worker_state
        worker_state.reset_state()
    except Exception:
        logger.debug("could not reset worker state", exc_info=True)
    signals.worker_process_init.send(sender=process_init_sender(config.hostname))


def _memory_kib() -> int:
    """billiard.compat.mem_rss: the peak RSS of this process in KiB."""
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if sys.platform == "darwin" or "bsd" in sys.platform:
        value //= 1024
    return int(value)


def _run(runner: Any, task_name: str, message: Any) -> Outcome:
    """Run one job; task errors are in the Outcome, our own are INTERNAL_ERROR."""
    global _in_task
    _in_task = True
    try:
        return runner.run(runner.app.tasks[task_name], message)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except SoftTimeLimitExceeded as exc:
        # Arrived outside the task body (in our bookkeeping around it).
        return Outcome(State.INTERNAL_ERROR, exc, exception_repr=repr(exc))
    except Exception as exc:
        logger.critical("Task %s[%s] INTERNAL ERROR: %r", message.name, message.id, exc,
                        exc_info=True)
        return Outcome(State.INTERNAL_ERROR, exc, exception_repr=repr(exc))
    finally:
        _in_task = False


def child_main(sock: Any, runner: Any, config: ChildConfig,
               close_fds: list[int]) -> None:
    """The whole life of a pool process. Never returns."""
    global _terminating, _in_task
    exitcode: Any = 1
    pid = os.getpid()
    initialised = False
    try:
        _terminating = _in_task = False
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        install_signals()
        _patch_sys_exit()
        _become_pool_process(config)
        runner = runner.for_new_process()
        _init_app(runner.app, config)
        initialised = True
        if config.group_commit:
            group_commit.enable()  # this process's own writer, started on first use
        exitcode = _serve(sock, runner, config, pid)
    except SystemExit as exc:
        code = exc.code
        exitcode = code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException as exc:
        if not initialised:
            logger.error("Pool process %s error: %r", config.name, exc, exc_info=True)
        else:
            logger.critical("Pool process %s error: %r", config.name, exc, exc_info=True)
        exitcode = 1
    finally:
        try:
            # Results of tasks reported done are stored before we go (a
            # terminate signal leaves HARD_KILL_GRACE for it; a write cut
            # off is settled by the parent as a lost worker's).
            _writes.wait(FLUSH_TIMEOUT)
        except BaseException:
            pass
        if initialised:
            coroutines.close_thread_loop()
        try:
            if initialised:
                from celery import signals
                signals.worker_process_shutdown.send(
                    sender=config.hostname, pid=pid, exitcode=exitcode)
        except BaseException:
            pass
        try:
            for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
                if stream is not None:
                    stream.flush()
        except BaseException:
            pass
        os._exit(exitcode if isinstance(exitcode, int) else 1)


class _PendingWrites:
    """This child's deferred SUCCESS writes, by job number.

    ``written`` is sent from the writer thread as each write finishes, so
    every frame goes out under one lock (two threads share the socket).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: Any = None
        self._writes: dict[int, Any] = {}

    def attach(self, sock: Any) -> None:
        self._sock = sock

    def send(self, message: tuple) -> None:
        frame = procproto.dumps(message)
        with self._lock:
            self._sock.sendall(frame)

    def announce_ack(self, key: Any) -> None:
        try:
            self.send(("ack", key))
        except OSError:
            pass  # the parent is gone

    def track(self, job_no: int, write: Any) -> None:
        """Say ``written`` for ``job_no`` once ``write`` is done (``done`` was sent)."""
        self._writes[job_no] = write
        write.add_done_callback(lambda done: self._written(job_no, done))

    def _written(self, job_no: int, write: Any) -> None:
        self._writes.pop(job_no, None)
        error = write.exception()
        if error is not None:
            error = _picklable(error)
        try:
            self.send(("written", job_no, error))
        except OSError:
            pass  # the parent is gone; it settles nothing more

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for write in list(self._writes.values()):
            try:
                write.exception(max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                logger.error("%d result write(s) still unfinished at exit", len(self._writes))
                return


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(repr(error))


_writes = _PendingWrites()
_keeps_exception: dict[str, bool] = {}


def _crossing_retval(runner: Any, task_name: str, retval: Any) -> Any:
    """What of a run's ``retval`` goes to the parent: nothing, except the
    exception of a task with its own ``Request`` class, whose ``on_failure``
    gets it in the parent as Celery's does (if it pickles)."""
    if not isinstance(retval, BaseException):
        return None
    keeps = _keeps_exception.get(task_name)
    if keeps is None:
        task = runner.app.tasks.get(task_name)
        keeps = _keeps_exception[task_name] = (
            task is not None and own_request_class(task) is not None)
    if not keeps:
        return None
    try:
        pickle.loads(pickle.dumps(retval))  # the parent must be able to read it back
    except Exception:  # noqa: BLE001 - any pickling failure
        return None
    retval.__traceback__ = None
    return retval


def _serve(sock: Any, runner: Any, config: ChildConfig, pid: int) -> int:
    """The job loop. Returns the exit code."""
    _writes.attach(sock)
    send = _writes.send
    # A held early ack that comes due here goes to the parent, which tells
    # its consumer (backends/riding_acks.py, notice tickets).
    riding_acks.on_ack_due(_writes.announce_ack)
    reader = procproto.FrameReader()
    send(("up", pid))
    completed = 0
    max_tasks = config.max_tasks
    max_memory = config.max_memory_kib or 0
    while True:
        message = procproto.recv_message(sock, reader)
        if message is None or message[0] == "stop":
            return 0
        _, job_no, task_name, task_message = message
        send(("accepted", job_no))
        try:
            outcome = _run(runner, task_name, task_message)
        except SystemExit as exc:
            if _terminating:
                # Killed by the parent (hard time limit) or the operator:
                # the job did not finish and nothing is reported for it.
                raise
            # The task's own SystemExit: Celery reports the worker as lost
            # (with the exception's code), and the process leaves with the
            # code given to ``sys.exit()``, or 0 for a bare ``raise
            # SystemExit``, as billiard's child does.
            send(("exit", job_no, exc.code))
            code = _sys_exit_code[0]
            raise SystemExit(code if isinstance(code, int) else 0) from None
        except KeyboardInterrupt:
            send(("exit", job_no, 1))
            raise SystemExit(1) from None
        completed += 1
        last = False
        exitcode = 0
        if max_tasks and completed >= max_tasks:
            last, exitcode = True, procproto.EX_RECYCLE
        elif max_memory > 0:
            used = _memory_kib()
            if used <= 0:
                billiard_logger.error("worker unable to determine memory usage")
            elif used > max_memory:
                billiard_logger.warning(MAXMEM_USED_FMT.format(used, max_memory))
                last, exitcode = True, procproto.EX_RECYCLE
        outcome.retval = _crossing_retval(runner, task_name, outcome.retval)
        durable, outcome.durable = outcome.durable, None
        send(("done", job_no, outcome, last, durable is not None))
        if durable is not None:
            _writes.track(job_no, durable)
        if last:
            return exitcode
