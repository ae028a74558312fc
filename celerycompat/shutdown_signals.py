"""How the worker hears signals and the ``shutdown`` command (wire contract G8).

Celery's rules: SIGTERM and a first SIGINT are a warm shutdown (stop
consuming, let running tasks finish; exit 0 after SIGTERM, 1 after
SIGINT), a second SIGINT or a SIGQUIT a cold one. With
``worker_soft_shutdown_timeout`` a cold shutdown is soft first: running
tasks get that many seconds to finish. SIGUSR1 prints every thread's stack
(Celery's "cry"), and when stdout is not a terminal SIGHUP restarts the
worker in place: a warm stop, then the same command line ``exec``\\ ed
(Celery's restart handler). Each request sends ``worker_shutting_down``
and prints Celery's line on the real stderr; the `Worker` then carries
the shutdown out (`Worker.shutdown`).

These are the `Worker`'s methods (a mixin); what they use of it is listed
on `ShutdownSignals`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

from celery import signals

from celerycompat.celery_release import setting

shutdown_logger = logging.getLogger("celery.worker.worker")

EX_OK = 0
EX_FAILURE = 1


class ShutdownSignals:
    """The `Worker`'s signal handlers and shutdown requests (module docstring).

    What it uses of the worker: ``app``, ``options`` (the pool), ``nodename``,
    ``consumer``, ``exitcode``, ``_shutdown_requests``, ``_cold`` and
    ``_soft_deadline``.
    """

    app: Any
    options: Any
    nodename: str
    consumer: Any
    exitcode: int
    _shutdown_requests: int
    _cold: bool
    _soft_deadline: float | None

    def _remote_shutdown(self) -> None:
        """The ``shutdown`` command: a warm shutdown with exit code 0 (G8)."""
        self._request_shutdown("Warm", EX_OK, signal.SIGTERM)

    def install_signal_handlers(self) -> None:
        install: Any = signal.signal
        if self.options.pool == "gevent":
            # In a greenlet, not in the event loop, so that worker_shutting_down
            # receivers may do I/O.
            from celerycompat.pools.gevent_pool import install_signal_handler as install
        elif self.options.pool == "eventlet":
            from celerycompat.pools.eventlet_pool import install_signal_handler as install
        install(signal.SIGTERM, self._on_sigterm)
        install(signal.SIGINT, self._on_sigint)
        if hasattr(signal, "SIGQUIT"):
            install(signal.SIGQUIT, self._on_sigquit)
        if hasattr(signal, "SIGUSR1"):
            install(signal.SIGUSR1, self._on_sigusr1)
        stdout = sys.__stdout__
        if hasattr(signal, "SIGHUP") and not (stdout is not None and stdout.isatty()):
            # As Celery: only away from a terminal, so closing the terminal
            # window does not restart the worker into the background.
            install(signal.SIGHUP, self._on_sighup)

    def _on_sigusr1(self, signum: int, frame: Any) -> None:
        """Every thread's stack and locals on stderr, with Celery's own
        ``cry`` (what ``kill -USR1`` shows for ``celery worker``)."""
        from celery.utils.debug import cry

        print(cry(), file=sys.__stderr__, flush=True)

    def _on_sighup(self, signum: int, frame: Any) -> None:
        """Celery's restart: the line on stdout, a warm stop with no
        ``worker_shutting_down`` (Celery sends none for a restart), then
        :func:`celerycompat.daemon.restart` at exit."""
        import atexit

        from celerycompat.daemon import restart

        print(f"Restarting celery worker ({' '.join(sys.argv)})",
              file=sys.__stdout__, flush=True)
        # At exit, as Celery's: after the pidfile is released and the
        # stdouts are restored.
        atexit.register(restart)
        if self.consumer is not None:
            self.consumer.should_stop = True

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if os.environ.get("REMAP_SIGTERM") == "SIGQUIT":
            return self._on_sigquit(signum, frame)
        self._request_shutdown("Warm", EX_OK, signum)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._shutdown_requests:
            return self._on_sigquit(signum, frame)
        self._request_shutdown("Warm", EX_FAILURE, signum)

    def _on_sigquit(self, signum: int, frame: Any) -> None:
        if self._soft_deadline is not None and not self._cold:
            # Celery's ``during_soft_shutdown``: a cold signal in the soft
            # window cancels the running tasks. Ours ends the window at once.
            print("Waiting gracefully for cold shutdown to complete...",
                  file=sys.__stderr__, flush=True)
            self._cold = True
            return
        if not self._cold:
            print("worker: Hitting Ctrl+C again will terminate all running tasks!",
                  file=sys.__stderr__, flush=True)
            self._cold = not self._begin_soft_shutdown()
        self._request_shutdown("Cold", EX_FAILURE, signum)

    def _begin_soft_shutdown(self) -> bool:
        """Open the soft window of a cold shutdown, if configured and worth it.

        As Celery's ``wait_for_soft_shutdown``: only with tasks running,
        unless ``worker_enable_soft_shutdown_on_idle``. Celery sleeps the
        whole timeout; ccworker ends the window as soon as nothing runs
        (reserved and ETA messages go back to the queue at every shutdown,
        idle or not).
        """
        conf = self.app.conf
        timeout = setting(conf, "worker_soft_shutdown_timeout") or 0
        running = self.consumer is not None and bool(self.consumer.active)
        if not timeout or timeout <= 0 or not (
                running or setting(conf, "worker_enable_soft_shutdown_on_idle")):
            return False
        shutdown_logger.warning("Initiating Soft Shutdown, terminating in %s seconds", timeout)
        self._soft_deadline = time.monotonic() + float(timeout)
        return True

    def _request_shutdown(self, how: str, exitcode: int, signum: int) -> None:
        first = self._shutdown_requests == 0
        self._shutdown_requests += 1
        if first or how == "Cold":
            self.exitcode = exitcode
            sig = signal.Signals(signum).name
            signals.worker_shutting_down.send(sender=self.nodename, sig=sig, how=how,
                                              exitcode=exitcode)
            # The real stderr: sys.stderr is redirected into the log, and
            # Celery prints this line outside the log format too.
            print(f"\nworker: {how} shutdown (MainProcess)", file=sys.__stderr__, flush=True)
        if self.consumer is not None:
            self.consumer.should_stop = True
