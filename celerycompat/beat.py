"""``-B``: Celery's own beat service embedded in the worker, as ``celery worker -B`` runs it.

What Celery 5.7 does (``celery/worker/components.py``, ``Beat`` bootstep, and
``celery.beat.EmbeddedService``), and so what ccworker does:

* the schedule runs in a **child process** named ``Beat`` (a thread only
  where ``multiprocessing`` is missing), forked after the pool started and
  before the consumer connects. It is Celery's own ``celery.beat.Service``
  with the scheduler class of ``--scheduler``/``beat_scheduler`` (aliases
  such as ``django`` from the ``celery.beat_schedulers`` entry points) and
  the file of ``-s``/``beat_schedule_filename``, so ``beat_init``,
  ``beat_embedded_init``, the ``celery beat`` process title, the schedule
  file and its locking are Celery's; nothing of the schedule is ours;
* ``-B`` with a green pool (``gevent``, ``eventlet``: the pool *asked for*,
  even where ccworker runs another one) is refused with Celery's message
  and exit status 1, after ``worker_init`` as in Celery; on Windows the flag
  itself is a usage error (:mod:`celerycompat.cli`);
* at shutdown, with the consumer: ``beat: Shutting down...``, SIGTERM to the
  child, which saves the schedule and exits. Celery then waits for the child
  at interpreter exit, without limit (a child that missed the SIGTERM keeps
  the worker from exiting); ccworker repeats the request and waits at most
  :data:`STOP_TIMEOUT` seconds, then kills the child, so a stuck scheduler
  cannot hold the worker.

The child is started before ccworker installs its own signal handlers, so it
keeps Python's: Ctrl-C in a terminal (SIGINT to the whole process group)
stops it cleanly, as SIGTERM does.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any, Optional

logger = logging.getLogger("celery.apps.worker")

#: Seconds to wait for the beat child to save its schedule and exit.
STOP_TIMEOUT = 10.0
#: Seconds between repeated stop requests while waiting (see ``EmbeddedBeat._wait``).
NUDGE_INTERVAL = 3.0

#: Where ``celery worker`` finds the pool class of each ``-P`` alias.
_POOL_MODULES = {
    "prefork": "celery.concurrency.prefork",
    "processes": "celery.concurrency.prefork",
    "eventlet": "celery.concurrency.eventlet",
    "gevent": "celery.concurrency.gevent",
    "solo": "celery.concurrency.solo",
    "threads": "celery.concurrency.thread",
}


def _pool_module(requested_pool: str) -> str:
    """The module of the pool class ``celery worker`` would load for ``requested_pool``.

    Celery decides on ``pool_cls.__module__``; a ``-P custom`` pool is the
    class named by ``CELERY_CUSTOM_WORKER_POOL``, any other value a
    ``module:Class`` or ``module.Class`` path.
    """
    if requested_pool in _POOL_MODULES:
        return _POOL_MODULES[requested_pool]
    path = requested_pool
    if requested_pool == "custom":
        path = os.environ.get("CELERY_CUSTOM_WORKER_POOL", "")
    if ":" in path:
        return path.partition(":")[0]
    return path.rpartition(".")[0] or path


def refusal(options: Any) -> Optional[str]:
    """Celery's reason to refuse ``-B`` with these options, or ``None``.

    ``options`` is a :class:`celerycompat.options.WorkerOptions`. Celery
    refuses an embedded beat next to a green pool (its schedule loop would
    block the hub): the message is Celery's own constant.
    """
    if not options.beat:
        return None
    if _pool_module(options.requested_pool).endswith(("gevent", "eventlet")):
        from celery.worker.components import ERR_B_GREEN

        return ERR_B_GREEN
    return None


class EmbeddedBeat:
    """One embedded beat service: Celery's ``EmbeddedService``, started and stopped once."""

    def __init__(self, app: Any, schedule_filename: Optional[str],
                 scheduler: Optional[str]) -> None:
        self.app = app
        self.schedule_filename = schedule_filename
        self.scheduler = scheduler
        self.service: Any = None

    def start(self) -> None:
        """Fork (or, without ``multiprocessing``, spawn a thread) and run the schedule."""
        from celery.beat import EmbeddedService

        service = EmbeddedService(self.app, schedule_filename=self.schedule_filename,
                                  scheduler_cls=self.scheduler)
        service.start()
        self.service = service

    @property
    def pid(self) -> Optional[int]:
        """The beat child's pid (``None`` when it runs as a thread or not at all)."""
        if self.service is None or isinstance(self.service, threading.Thread):
            return None
        return self.service.pid

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Ask the service to stop, wait up to ``timeout`` for it, kill it after.

        Safe to call more than once, and when :meth:`start` failed.
        """
        service, self.service = self.service, None
        if service is None:
            return
        threaded = isinstance(service, threading.Thread)
        pid = None if threaded else service.pid
        try:
            if threaded:
                # Celery's thread variant waits for the schedule to be saved
                # with no limit; a thread that failed before its loop would
                # never say so. Ask, then wait below with a limit.
                service.service.stop(wait=False)
            else:
                service.stop()  # "beat: Shutting down..." and SIGTERM to the child
        except Exception:
            logger.exception("beat: could not ask the embedded beat to stop")
        if not self._wait(service, pid, timeout):
            logger.warning("beat: the embedded beat did not stop within %.0fs", timeout)
            if pid:
                _signal(pid, signal.SIGKILL)
                self._wait(service, None, 5.0)
        if not service.is_alive():
            service.join()  # reaps the child; returns at once

    @staticmethod
    def _wait(service: Any, pid: Optional[int], timeout: float) -> bool:
        """Wait until ``service`` ended; ``False`` if it still runs after ``timeout``.

        Polls instead of ``join(timeout)``: the beat child closes every
        inherited descriptor when it starts, the end of the pipe billiard
        waits on among them, so billiard's ``join`` with a timeout blocks
        until the child exits. While waiting, the child is asked again every
        :data:`NUDGE_INTERVAL` with SIGINT: a SIGTERM that arrives while
        Python runs a finalizer (``__del__``) is swallowed and the schedule
        loop goes on; ``KeyboardInterrupt`` is the other stop request
        Celery's service honours (it saves the schedule then). The interval
        is long enough for a child that did take the SIGTERM to finish
        saving before a second request could interrupt it.
        """
        deadline = time.monotonic() + timeout
        nudge = time.monotonic() + NUDGE_INTERVAL
        while service.is_alive():
            now = time.monotonic()
            if now >= deadline:
                return False
            if pid and now >= nudge:
                _signal(pid, signal.SIGINT)
                nudge = now + NUDGE_INTERVAL
            time.sleep(0.05)
        return True


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def start_embedded_beat(options: Any) -> Optional[EmbeddedBeat]:
    """``-B``: start Celery's beat next to the worker; ``None`` without ``-B``.

    Call it after the pool started and before the consumer connects (the
    ``Beat`` bootstep's place), and before the worker's signal handlers are
    installed (see the module docstring).
    """
    if not options.beat:
        return None
    beat = EmbeddedBeat(options.app, options.schedule_filename, options.scheduler)
    beat.start()
    return beat
