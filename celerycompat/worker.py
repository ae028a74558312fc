"""The worker: builds the parts from `WorkerOptions`, runs them, shuts them down.

Start-up follows ``celery worker``'s order where a project can observe it:
``celeryd_init`` and the loader's worker init (imports, Django fixup,
``import_modules``, ``worker_init``) before anything connects,
``celeryd_after_setup`` once queues are chosen, the pool (``worker_process_init``
for solo), then connect, consume, ``worker_ready`` and the ``<nodename>
ready.`` log line. Shutdown is Celery's (wire contract G8): SIGTERM and a
first SIGINT are warm (stop consuming, finish running tasks, exit 0 / 1), a
second SIGINT or SIGQUIT is cold.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

from celery import signals

from celerycompat.backends import result_store_for
from celerycompat.consumer.consumer import Consumer
from celerycompat.consumer.kombu_broker import KombuBroker
from celerycompat.consumer.queues import select_queues
from celerycompat.control.commands import ControlState
from celerycompat.control.mailbox import ControlMailbox
from celerycompat.events.dispatcher import EventDispatcher
from celerycompat.execution.runner import RunSettings, TaskRunner
from celerycompat.pools.prefork import PreforkPool
from celerycompat.pools.solo import SoloPool
from celerycompat.pools.threads import ThreadPool
from celerycompat.protocol import codecs
from celerycompat.protocol import message as wire

logger = logging.getLogger("celery.apps.worker")

EX_OK = 0
EX_FAILURE = 1


def make_decoder(accept: Any) -> wire.Decoder:
    """The consumer's body decoder: ``accept_content`` enforced, kombu's errors mapped."""
    accepted = codecs.prepare_accept(accept)

    def decode(body: bytes, content_type: str | None, content_encoding: str | None) -> Any:
        try:
            return codecs.loads(body, content_type, content_encoding, accepted)
        except codecs.ContentDisallowed:
            raise
        except codecs.DecodeError as exc:
            raise wire.BodyUndecodable(exc) from exc

    return decode


def make_pool(options: Any, runner: TaskRunner) -> Any:
    if options.pool == "solo":
        return SoloPool(runner, options.nodename)
    if options.pool == "prefork":
        return PreforkPool(
            runner, options.concurrency, hostname=options.nodename,
            max_tasks_per_child=options.max_tasks_per_child,
            max_memory_per_child=options.max_memory_per_child,
            time_limit=options.time_limit, soft_time_limit=options.soft_time_limit,
            loglevel=options.loglevel, logfile=options.logfile,
            proc_alive_timeout=options.app.conf.worker_proc_alive_timeout,
        )
    return ThreadPool(runner, options.concurrency)


class Worker:
    """One ccworker process: consumer + pool + result store for one app."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.app = options.app
        self.nodename = options.nodename
        self.exitcode = EX_OK
        self._shutdown_requests = 0
        self._cold = False
        self.consumer: Consumer | None = None
        self.pool: Any = None

    # -- start -------------------------------------------------------------------

    def setup(self) -> None:
        app, options = self.app, self.options
        queues = options.consume_queues or select_queues(
            app, options.queues, options.exclude_queues, self.nodename)
        signals.celeryd_after_setup.send(sender=self.nodename, instance=self, conf=app.conf)
        store = result_store_for(app)
        runner = TaskRunner(app, RunSettings(
            hostname=self.nodename, loglevel=options.loglevel,
            logfile=getattr(options, "logfile_path", options.logfile)), result_store_for)
        self.pool = make_pool(options, runner)
        self.pool.start()
        self.consumer = Consumer(
            app=app,
            broker_factory=self._broker,
            pool=self.pool,
            store=store,
            queues=queues,
            decode=make_decoder(app.conf.accept_content),
            hostname=self.nodename,
            prefetch_multiplier=options.prefetch_multiplier,
            purge=options.purge,
            dispatcher=self._event_dispatcher(),
            heartbeat_interval=None if options.without_heartbeat else options.heartbeat_interval,
            control=self._control_mailbox,
            mingle=not options.without_mingle,
        )

    def _broker(self) -> KombuBroker:
        """A fresh broker connection, with the AMQP heartbeat Celery's consumer asks for."""
        conf = self.app.conf
        return KombuBroker(self.app.connection_for_read(heartbeat=conf.broker_heartbeat),
                           heartbeat_rate=conf.broker_heartbeat_checkrate)

    def _event_dispatcher(self) -> EventDispatcher | None:
        """Events are off altogether without -E, heartbeats and gossip (E18)."""
        options = self.options
        if not (options.task_events or not options.without_heartbeat
                or not options.without_gossip):
            return None
        return EventDispatcher(self.app, self.nodename, task_events=options.task_events)

    def _control_mailbox(self, consumer: Consumer) -> ControlMailbox | None:
        """The pidbox node, unless ``worker_enable_remote_control`` is off (F12)."""
        if not self.app.conf.worker_enable_remote_control:
            return None
        state = ControlState(app=self.app, hostname=self.nodename, consumer=consumer)
        return ControlMailbox(self.app, self.nodename, state, on_shutdown=self._remote_shutdown)

    def _remote_shutdown(self) -> None:
        """The ``shutdown`` command: a warm shutdown with exit code 0 (G8)."""
        self._request_shutdown("Warm", EX_OK, signal.SIGTERM)

    def on_ready(self) -> None:
        signals.worker_ready.send(sender=self.consumer)
        logger.info("%s ready.", self.nodename)

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigint)
        if hasattr(signal, "SIGQUIT"):
            signal.signal(signal.SIGQUIT, self._on_sigquit)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if os.environ.get("REMAP_SIGTERM") == "SIGQUIT":
            return self._on_sigquit(signum, frame)
        self._request_shutdown("Warm", EX_OK, signum)

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._shutdown_requests:
            return self._on_sigquit(signum, frame)
        self._request_shutdown("Warm", EX_FAILURE, signum)

    def _on_sigquit(self, signum: int, frame: Any) -> None:
        self._cold = True
        self._request_shutdown("Cold", EX_FAILURE, signum)

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

    # -- run ---------------------------------------------------------------------

    def run(self) -> int:
        self.setup()
        self.install_signal_handlers()
        assert self.consumer is not None
        try:
            self.consumer.run(on_ready=self.on_ready)
            self.shutdown()
        finally:
            self.consumer.close()
            signals.worker_shutdown.send(sender=self)
        return self.exitcode

    def shutdown(self) -> None:
        """Warm: return reserved messages, let running tasks finish and settle them."""
        consumer = self.consumer
        assert consumer is not None
        consumer.stop_consuming()
        while consumer.has_work() and not self._cold:
            consumer.drain(0.1)
        if self._cold:
            consumer.return_running()
        self.pool.stop(wait=not self._cold)
        if not self._cold:
            consumer.drain(0)


def run(options: Any) -> int:
    """Run a worker until it is told to stop; return the process exit code."""
    worker = Worker(options)
    started = time.monotonic()
    try:
        return worker.run()
    finally:
        logger.debug("worker ran for %.1fs", time.monotonic() - started)
