"""The worker: builds the parts from `WorkerOptions`, runs them, shuts them down.

Start-up follows ``celery worker``'s order where a project can observe it:
``celeryd_init`` and the loader's worker init (imports, Django fixup,
``import_modules``, ``worker_init``) before anything connects,
``celeryd_after_setup`` once queues are chosen, the pool (``worker_process_init``
for solo), then connect, consume, ``worker_ready`` and the ``<nodename>
ready.`` log line. Shutdown is Celery's (wire contract G8): the signals
and the ``shutdown`` command are heard in `celerycompat.shutdown_signals`,
and `Worker.shutdown` carries a warm or cold stop out.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from celery import signals
from celery._state import _set_task_join_will_block

from celerycompat.backends import group_commit, result_store_for
from celerycompat.beat import EmbeddedBeat, start_embedded_beat
from celerycompat.celery_release import celery_version, setting, support_warning
from celerycompat.consumer.autoscale import Autoscaler
from celerycompat.consumer.consumer import Consumer
from celerycompat.consumer.decoder import make_decoder, max_message_bytes
from celerycompat.consumer.delayed_delivery import native_delayed_delivery
from celerycompat.consumer.kombu_broker import KombuBroker
from celerycompat.consumer.project_requests import ProjectRequests, project_requests
from celerycompat.consumer.queues import select_queues
from celerycompat.consumer.redis_broker import RedisBroker
from celerycompat.consumer.redis_eligibility import native_path_eligible
from celerycompat.consumer.statedb import StateDB
from celerycompat.control.gossip import Gossip
from celerycompat.control.mailbox import ControlMailbox
from celerycompat.control.registry import ControlState
from celerycompat.events.dispatcher import EventDispatcher
from celerycompat.execution.runner import RunSettings, TaskRunner
from celerycompat.pools.child import ChildConfig
from celerycompat.pools.prefork import PreforkPool
from celerycompat.pools.solo import SoloPool
from celerycompat.pools.spawned import SpawnSpec
from celerycompat.pools.threads import ThreadPool
from celerycompat.project_steps import StepFailed, StepRunner, project_steps
from celerycompat.shutdown_signals import EX_FAILURE, EX_OK, ShutdownSignals

if TYPE_CHECKING:
    from celerycompat.observability.service import Observability

logger = logging.getLogger("celery.apps.worker")


def autoscale_bounds(options: Any) -> tuple[int, int] | None:
    """``--autoscale``'s ``(max, min)``; None without it, or on solo, which
    cannot resize (options.py warns about it)."""
    if options.autoscale is None or options.pool == "solo":
        return None
    high, low = options.autoscale
    return int(high), int(low)


def make_pool(options: Any, runner: TaskRunner) -> Any:
    # With --autoscale the pool starts with the minimum, as Celery's does.
    bounds = autoscale_bounds(options)
    concurrency = bounds[1] if bounds is not None else options.concurrency
    if options.pool == "solo":
        return SoloPool(runner, options.nodename, time_limit=options.time_limit,
                        soft_time_limit=options.soft_time_limit)
    if options.pool == "prefork":
        return PreforkPool(
            runner, concurrency, hostname=options.nodename,
            max_tasks_per_child=options.max_tasks_per_child,
            max_memory_per_child=options.max_memory_per_child,
            time_limit=options.time_limit, soft_time_limit=options.soft_time_limit,
            loglevel=options.loglevel, logfile=options.logfile,
            proc_alive_timeout=options.app.conf.worker_proc_alive_timeout,
            spawning=spawn_spec(options) if options.pool_start_method == "spawn" else None,
        )
    if options.pool == "gevent":
        # Imported only here: gevent is used only if the process was patched.
        from celerycompat.pools.gevent_pool import GeventPool

        return GeventPool(runner, concurrency, time_limit=options.time_limit,
                          soft_time_limit=options.soft_time_limit)
    if options.pool == "asyncio":
        try:  # imported only here: it needs greenlet (the asyncio extra)
            from celerycompat.pools.asyncio_pool import AsyncioPool
        except ImportError as exc:
            logger.critical("-P asyncio needs greenlet: pip install 'celerycompat[asyncio]' "
                            "(%s)", exc)
            raise SystemExit(1) from exc

        return AsyncioPool(runner, concurrency, time_limit=options.time_limit,
                           soft_time_limit=options.soft_time_limit)
    if options.pool == "eventlet":
        from celerycompat.pools.eventlet_pool import EventletPool

        return EventletPool(runner, concurrency, time_limit=options.time_limit,
                            soft_time_limit=options.soft_time_limit)
    return ThreadPool(runner, concurrency, time_limit=options.time_limit,
                      soft_time_limit=options.soft_time_limit)


def spawn_spec(options: Any) -> SpawnSpec:
    """What a spawned prefork child loads and sets up (pools/spawned.py); its
    ``child`` config is the pool's, per child."""
    observability = getattr(options, "observability", None)
    return SpawnSpec(
        child=ChildConfig(hostname=options.nodename, index=0, name=""),
        app_spec=options.app_spec,
        hostname=options.nodename, loglevel=options.loglevel, logfile=options.logfile,
        no_color=options.no_color,
        log_format=getattr(observability, "log_format", None) or "text",
    )


class Worker(ShutdownSignals):
    """One ccworker process: consumer + pool + result store for one app."""

    def __init__(self, options: Any) -> None:
        self.options = options
        self.app = options.app
        self.nodename = options.nodename
        self.exitcode = EX_OK
        self._shutdown_requests = 0
        self._cold = False
        #: ``worker_soft_shutdown_timeout``: when the soft window of a cold
        #: shutdown ends (monotonic); None outside one.
        self._soft_deadline: float | None = None
        self.consumer: Consumer | None = None
        self.pool: Any = None
        self.statedb: StateDB | None = None
        self.observability: Observability | None = None
        self.beat: EmbeddedBeat | None = None
        #: The project's own bootsteps (project_steps.py); None without any.
        self.steps: StepRunner | None = None
        #: Tasks with their own Request class (consumer/project_requests.py); None without any.
        self.requests: ProjectRequests | None = None

    # -- start -------------------------------------------------------------------

    def setup(self) -> None:
        app, options = self.app, self.options
        outside = support_warning(celery_version())
        if outside:
            logger.warning("ccworker: %s", outside)
        try:
            max_bytes = max_message_bytes(app.conf)
        except ValueError as exc:
            logger.critical("%s", exc)
            raise SystemExit(EX_FAILURE) from exc
        self._start_observability()
        queues = options.consume_queues or select_queues(
            app, options.queues, options.exclude_queues, self.nodename)
        signals.celeryd_after_setup.send(sender=self.nodename, instance=self, conf=app.conf)
        store = result_store_for(app)
        runner = TaskRunner(app, RunSettings(
            hostname=self.nodename, loglevel=options.loglevel,
            logfile=getattr(options, "logfile_path", options.logfile)), result_store_for)
        if options.pool in ("solo", "threads", "gevent", "eventlet", "asyncio"):
            # Tasks run in this process: SUCCESS writes may be grouped
            # (backends/group_commit.py). Prefork children enable it for
            # themselves (pools/child.py).
            group_commit.enable()
        self.pool = make_pool(options, runner)
        # As Celery's Pool bootstep, before the pool starts (prefork
        # children set it again for themselves, as Celery's do).
        _set_task_join_will_block(self.pool.task_join_will_block)
        self.pool.start()
        self.consumer = Consumer(
            app=app,
            broker_factory=self._broker,
            pool=self.pool,
            store=store,
            queues=queues,
            decode=make_decoder(app.conf.accept_content, max_bytes),
            hostname=self.nodename,
            prefetch_multiplier=options.prefetch_multiplier,
            disable_prefetch=options.disable_prefetch,
            purge=options.purge,
            dispatcher=self._event_dispatcher(),
            heartbeat_interval=None if options.without_heartbeat else options.heartbeat_interval,
            control=self._control_mailbox,
            mingle=not options.without_mingle,
            metrics=self.observability.metrics if self.observability is not None else None,
        )
        if self.observability is not None:
            self.observability.watch(self.consumer)
        if not options.without_gossip and self.consumer.dispatcher is not None:
            self.consumer.gossip = Gossip(app, self.nodename, os.getpid(),
                                          self.consumer.dispatcher)
            self.consumer.observe(self.consumer.gossip)
        self._start_autoscaler(self.consumer)
        # Celery >= 5.5 on quorum queues: its own DelayedDelivery step, run at
        # every connection (consumer/delayed_delivery.py).
        self.consumer.observe(native_delayed_delivery(app))
        # Tasks with their own Request class: its hooks, where Celery calls
        # them (consumer/project_requests.py).
        self.requests = project_requests(app, self.pool, options.pool)
        self.consumer.observe(self.requests)
        if options.statedb:
            # Before the consumer connects: mingle's hello carries the loaded ids.
            # An unreadable file stops the start (exit 1), as in Celery.
            statedb = StateDB(options.statedb, self.consumer.revoked, app.clock)
            try:
                statedb.load()
            except Exception as exc:
                logger.critical("Cannot load the state database %s: %r", options.statedb, exc,
                                exc_info=True)
                statedb.close()
                raise SystemExit(EX_FAILURE) from exc  # run() stops the pool
            self.statedb = statedb
        try:
            # The project's bootsteps: built once every part exists.
            self.steps = project_steps(app, options, self.pool, self.consumer)
        except StepFailed as exc:
            raise SystemExit(EX_FAILURE) from exc
        self.consumer.observe(self.steps)
        self.consumer.project_steps = self.steps
        # -B: Celery's beat in a child process, after the pool and before the
        # consumer (the Beat bootstep's place) and our signal handlers (beat.py).
        self.beat = start_embedded_beat(options)
        if self.steps is not None:
            try:
                self.steps.start()  # the worker's steps, before the consumer's
            except StepFailed as exc:
                raise SystemExit(EX_FAILURE) from exc

    def _start_observability(self) -> None:
        """``--metrics-port``: serve metrics and probes before anything else starts,
        so a port that is taken stops the worker at once, with one clear line.

        The metrics stack (prometheus_client, an HTTP server) is imported
        here, only with ``--metrics-port``: without it no process of the
        worker carries it (a few MiB of RSS each, prefork children included).
        """
        settings = getattr(self.options, "observability", None)
        if settings is None or settings.metrics_port is None:
            return
        from celerycompat.observability.service import observability_for

        observability = observability_for(self.options)
        if observability is None:
            return
        settings = observability.settings
        try:
            observability.start()
        except OSError as exc:
            logger.critical("Cannot serve metrics on %s:%s: %s", settings.metrics_host,
                            settings.metrics_port, exc)
            raise SystemExit(EX_FAILURE) from exc
        self.observability = observability

    def _start_autoscaler(self, consumer: Consumer) -> None:
        """``--autoscale max,min`` (consumer/autoscale.py): ticked by the consumer
        loop; the prefetch count follows ``max``, as Celery's."""
        bounds = autoscale_bounds(self.options)
        if bounds is None:
            return
        high, low = bounds

        def on_max_changed(new_max: int) -> None:
            consumer.prefetch_slots = max(new_max, 1)
            consumer.pool_resized()

        consumer.prefetch_slots = max(high, 1)
        consumer.autoscaler = Autoscaler(
            self.pool, high, low, on_max_changed=on_max_changed,
            qty=lambda: len(consumer.reserved) + len(consumer.active))
        consumer.observe(consumer.autoscaler)

    def _broker(self) -> KombuBroker:
        """A fresh broker connection, with the AMQP heartbeat Celery's consumer asks for.

        On Redis the native fast path (redis_broker.py) is used unless
        ``CCWORKER_REDIS_FAST_PATH=0`` or a queue needs what only kombu's
        path does (see `native_path_eligible`).
        """
        conf = self.app.conf
        connection = self.app.connection_for_read(heartbeat=conf.broker_heartbeat)
        queues = self.consumer.queues if self.consumer is not None else ()
        broker_class = KombuBroker
        if os.environ.get("CCWORKER_REDIS_FAST_PATH", "1") != "0" and \
                native_path_eligible(connection, queues):
            broker_class = RedisBroker
        return broker_class(connection, heartbeat_rate=conf.broker_heartbeat_checkrate,
                            qos_global=self._qos_global(connection))

    def _qos_global(self, connection: Any) -> bool | None:
        """False when the app uses quorum queues, as Celery decides it
        (``worker_detect_quorum_queues``): RabbitMQ refuses global QoS on
        them. None: the adapter's own rule (global on RabbitMQ >= 3.3)."""
        if not setting(self.app.conf, "worker_detect_quorum_queues"):
            return None
        try:
            from celery.utils.quorum_queues import detect_quorum_queues
        except ImportError:  # Celery < 5.5 has no quorum queue support
            return None
        found, _ = detect_quorum_queues(self.app, connection.transport.driver_type)
        if not found:
            return None
        if not getattr(self, "_said_static_qos", False):
            logging.getLogger("celery.worker.consumer.tasks").info(
                "Global QoS is disabled. Prefetch count is now static.")
            self._said_static_qos = True
        return False

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

    def on_ready(self) -> None:
        if self.observability is not None:
            self.observability.ready()
        signals.worker_ready.send(sender=self.consumer)
        logger.info("%s ready.", self.nodename)

    # -- run ---------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.setup()
        except BaseException:
            self._abandon_setup()
            raise
        self.install_signal_handlers()
        assert self.consumer is not None
        try:
            self.consumer.run(on_ready=self.on_ready)
            if self.consumer.exitcode is not None:  # gave up on the broker (exit 1)
                self.exitcode = self.consumer.exitcode
            self._stop_beat()  # with the consumer, before running tasks drain (Celery's order)
            self.shutdown()
        finally:
            self._stop_beat()
            self._save_state()
            self.consumer.close()
            if self.observability is not None:
                self.observability.stop()
            signals.worker_shutdown.send(sender=self)
        return self.exitcode

    def _abandon_setup(self) -> None:
        """`setup` failed part way (an unreadable state db, a broker URL kombu
        refuses, a project's receiver raising): stop what it had started, so
        no pool process, beat child or metrics server outlives the failed start."""
        self._stop_beat()
        for part, stop in ((self.consumer, lambda c: c.close()),
                           (self.pool, lambda p: p.stop(wait=False)),
                           (self.observability, lambda o: o.stop())):
            if part is not None:
                try:
                    stop(part)
                except Exception:
                    logger.debug("stopping %r after a failed start failed", part, exc_info=True)

    def _stop_beat(self) -> None:
        if self.beat is not None:
            beat, self.beat = self.beat, None
            beat.stop()

    def _save_state(self) -> None:
        """``--statedb``: the revoked ids and the clock, at every exit (Celery: ``atexit``)."""
        if self.statedb is not None:
            try:
                self.statedb.save()
            except Exception:
                logger.exception("Could not save the state database %s", self.statedb.filename)

    def shutdown(self) -> None:
        """Warm: return reserved messages, let running tasks finish and settle them."""
        consumer = self.consumer
        assert consumer is not None
        consumer.stop_consuming()
        if self.steps is not None:
            self.steps.stop(cold=self._cold)
        while consumer.has_work() and not self._cold:
            if self._soft_deadline is not None and time.monotonic() >= self._soft_deadline:
                self._cold = True  # the soft window is over: cold from here
                break
            consumer.drain(0.1)
        if self._cold:
            consumer.cancel_on_cold_shutdown()
            consumer.return_running()
        self.pool.stop(wait=not self._cold)
        if not self._cold:
            consumer.drain(0)
        if self.steps is not None:
            self.steps.shutdown()
        if self.requests is not None:
            self.requests.close()


def run(options: Any) -> int:
    """Run a worker until it is told to stop; return the process exit code."""
    worker = Worker(options)
    started = time.monotonic()
    try:
        return worker.run()
    finally:
        logger.debug("worker ran for %.1fs", time.monotonic() - started)
