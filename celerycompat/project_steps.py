"""A project's own bootsteps (``app.steps['worker']`` / ``['consumer']``), run
where ``celery worker`` runs them.

Celery's worker is built from two blueprints of steps; a project adds its
own to either (the Celery docs' "Extensions and Bootsteps"): a liveness
step that touches a file on a timer, a `ConsumerStep` that consumes a
non-Celery queue on the worker's connection, a step that reads a command-line
option the project added through ``app.user_options['worker']``. ccworker
has no blueprint of its own, so only the project's steps are run, at the
points of ccworker's life that match Celery's:

* **order**: the installed Celery's own ``Blueprint`` graph (``requires``,
  ``last``) over Celery's default steps and the project's, so the
  project's steps come in the order Celery would put them; each is built
  (``__init__`` with the worker's options, then ``include``:
  ``include_if``/``create``) once the worker's parts exist;
* **worker steps**: started after the pool (and beat) and before the
  consumer connects; at shutdown ``close``, then ``stop`` (``terminate`` on
  a cold shutdown) in reverse, after the consumer's steps stopped and before
  running tasks are waited for;
* **consumer steps**: started at every connection, after consuming began
  and before ``worker_ready`` (`StepRunner.connected`); stopped when the
  connection is lost (Celery's ``blueprint.restart``) and at shutdown;
  ``shutdown`` once at the very end, after the pool stopped;
* ``inspect stats`` shows what the steps' ``info`` returns, as Celery's;
* a step that raises while being built or started stops the worker with
  Celery's ``Unrecoverable error: ...`` line and exit code 1; while stopping,
  Celery's ``Error on stopping ...`` line, and the next step is stopped.

Starting, stopping and their log lines are the installed Celery's own
``Blueprint`` methods, applied to the two parent objects below: `WorkerParent`
(the ``w`` a worker step sees) and `ConsumerParent` (the ``c`` of a consumer
step). They offer what steps commonly use; anything else a step reaches for
raises `MissingPart`, an ``AttributeError`` that names the attribute, so a
step that needs more of Celery's worker than ccworker has fails at start
with that one line rather than somewhere in the middle of a run.

Without project steps nothing here is built (``project_steps`` returns
None): no timer thread, no observer, no cost per task.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

logger = logging.getLogger("celery.worker")
timer_logger = logging.getLogger("celery.worker.components")


class MissingPart(AttributeError):
    """A project step asked ccworker's worker or consumer for something it does not have."""


class StepFailed(Exception):
    """A project step raised while being built or started; already logged."""


class _Parent:
    """What both parents share: the attributes set are the offer, the rest is refused."""

    _role = "parent"

    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes not set: dunder lookups (copy, pickle)
        # keep Python's usual answer.
        if name.startswith("__"):
            raise AttributeError(name)
        raise MissingPart(
            f"ccworker's {self._role} has no {name!r}: a custom bootstep asked for a part of "
            f"celery worker's {self._role} that ccworker does not offer (docs/compat.md, "
            f"custom bootsteps)")


class WorkerParent(_Parent):
    """The ``w`` of a worker step: ccworker's worker as Celery's ``WorkController`` shows it."""

    _role = "worker"

    def __init__(self, app: Any, options: Any, pool: Any, timer: Any) -> None:
        from celery.worker import state

        self.app = app
        self.hostname = options.nodename
        self.pool = pool
        self.timer = timer
        #: Celery's ``celery.worker.state`` module, its request sets kept by `RequestSets`.
        self.state = state
        self.hub = None
        self.use_eventloop = False
        self.concurrency = options.concurrency
        self.loglevel = options.loglevel
        self.logfile = options.logfile
        self.pool_cls = options.pool
        self.pidfile = getattr(options, "pidfile", None)
        self.consumer: Optional[ConsumerParent] = None
        self.steps: list = []
        self.blueprint: Any = None

    @property
    def active_requests(self) -> Any:
        return self.state.active_requests


class ConsumerParent(_Parent):
    """The ``c`` of a consumer step: ccworker's consumer as Celery's ``Consumer`` shows it.

    ``connection`` is the broker connection of the moment (the one just
    made while steps start, the lost one while they stop), as in Celery.
    """

    _role = "consumer"

    def __init__(self, consumer: Any, controller: WorkerParent) -> None:
        self._consumer = consumer
        self.app = consumer.app
        self.hostname = consumer.hostname
        self.pid = os.getpid()
        self.pool = controller.pool
        self.timer = controller.timer
        self.controller = controller
        self.event_dispatcher = consumer.dispatcher
        self.task_consumer = TaskConsumerView(consumer)
        self.connection: Any = None
        conninfo = consumer.app.connection_for_read()
        self.connection_errors = conninfo.connection_errors
        self.channel_errors = conninfo.channel_errors
        self.steps: list = []
        self.blueprint: Any = None


class TaskConsumerView:
    """``c.task_consumer``: the task queues consumed, as kombu's ``Consumer`` offers them
    (``add_queue`` + ``consume``, ``cancel_by_queue``, ``consuming_from``, ``queues``)."""

    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer

    @property
    def queues(self) -> list:
        return list(self._consumer.queues)

    def consuming_from(self, queue: Any) -> bool:
        name = getattr(queue, "name", queue)
        return any(q.name == name for q in self._consumer.queues)

    def add_queue(self, queue: Any) -> Any:
        """Consume ``queue`` (a kombu ``Queue``) too; ccworker starts at once."""
        if not self.consuming_from(queue):
            self._consumer.queues.append(queue)
            if self._consumer.broker is not None:
                self._consumer.broker.add_queue(queue)
        return queue

    def consume(self, no_ack: Any = None) -> None:
        """Nothing to do: queues added are consumed as they are added."""

    def cancel_by_queue(self, queue: str) -> None:
        self._consumer.queues = [q for q in self._consumer.queues if q.name != queue]
        if self._consumer.broker is not None:
            self._consumer.broker.cancel_queue(queue)


class RequestSets:
    """Celery's ``worker.state`` request sets (``requests``, ``reserved_requests``,
    ``active_requests``) kept as Celery's worker keeps them, for steps that read them."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def received(self, request: Any) -> None:
        self.state.requests[request.id] = request
        self.state.reserved_requests.add(request)

    def started(self, request: Any) -> None:
        self.state.active_requests.add(request)

    def _forget(self, request: Any) -> None:
        self.state.requests.pop(request.id, None)
        self.state.reserved_requests.discard(request)
        self.state.active_requests.discard(request)

    def finished(self, request: Any, outcome: Any, decision: Any) -> None:
        self._forget(request)

    def revoked(self, request: Any, **kwargs: Any) -> None:
        if not kwargs.get("terminated"):
            self._forget(request)

    def lost(self) -> None:
        """As Celery's ``Consumer.on_close``: reserved messages went back with the connection."""
        state = self.state
        for request in tuple(state.reserved_requests):
            if request not in state.active_requests:
                state.requests.pop(request.id, None)
        state.reserved_requests.clear()
        state.reserved_requests.update(tuple(state.active_requests))


def _ordered(blueprint: Any) -> list[type]:
    """The project's steps of ``blueprint``, in the order Celery's graph puts them.

    The graph is Celery's (``_finalize_steps``: ``requires`` and the ``last``
    step) over its default steps and the project's; Celery's own steps (and
    what they require) are then left out, since ccworker's parts stand in
    for them.
    """
    builtin = type(blueprint)()
    builtin_names = {step.name for step in builtin._finalize_steps(builtin.claim_steps())}
    ordered = blueprint._finalize_steps(blueprint.claim_steps())
    return [step for step in ordered if step.name not in builtin_names]


def _apply(blueprint: Any, parent: Any, kwargs: dict) -> None:
    """Build the project's steps on ``parent`` as Celery's ``Blueprint.apply`` does:
    every ``__init__`` first, then each ``include`` (``include_if``, ``create``)."""
    blueprint.order = []
    for step_class in _ordered(blueprint):
        step = step_class(parent, **kwargs)
        blueprint.steps[step.name] = step
        blueprint.order.append(step)
    logging.getLogger("celery.bootsteps").debug(
        "| %s: New boot order: {%s}", blueprint.alias,
        ", ".join(step.alias for step in blueprint.order))
    for step in blueprint.order:
        step.include(parent)
    parent.blueprint = blueprint


def _unrecoverable(exc: BaseException) -> StepFailed:
    logger.critical("Unrecoverable error: %r", exc, exc_info=True)
    return StepFailed(exc)


class StepRunner:
    """The project's steps of both blueprints and when they run (module docstring).

    A consumer observer (``connected``, ``disconnected``; the request hooks
    through `RequestSets`); the worker calls `start`, `stop` and `shutdown`.
    """

    def __init__(self, app: Any, options: Any, pool: Any, consumer: Any) -> None:
        from celery.utils.timer2 import Timer
        from celery.worker import WorkController
        from celery.worker.consumer import Consumer as CeleryConsumer

        self._consumer = consumer
        self.timer = Timer(on_error=self._on_timer_error)
        self.worker = WorkerParent(app, options, pool, self.timer)
        self.consumer = ConsumerParent(consumer, self.worker)
        self.requests = RequestSets(self.worker.state)
        kwargs = self._step_options(options)
        try:
            _apply(WorkController.Blueprint(steps=app.steps["worker"]), self.worker, kwargs)
            _apply(CeleryConsumer.Blueprint(steps=app.steps["consumer"]), self.consumer, kwargs)
        except Exception as exc:
            raise _unrecoverable(exc) from exc
        self.worker.consumer = self.consumer

    @staticmethod
    def _step_options(options: Any) -> dict:
        """The keyword arguments a step's ``__init__`` gets: worker options, as
        ``celery worker`` passes them on, and the project's own (``user_options``).

        Celery's ``WorkController`` keeps ``hostname``, the queues, ``include``
        and ``pidfile`` for itself, so its steps never see those.
        """
        return {
            "concurrency": options.concurrency,
            "loglevel": options.loglevel,
            "logfile": options.logfile,
            "pool_cls": options.pool,
            **dict(getattr(options, "user_options", {}) or {}),
        }

    @staticmethod
    def _on_timer_error(exc: BaseException) -> None:
        timer_logger.error("Timer error: %r", exc, exc_info=True)

    # -- the worker's steps ----------------------------------------------------

    def start(self) -> None:
        """Start the worker's steps (after the pool, before the consumer connects)."""
        try:
            self.worker.blueprint.start(self.worker)
        except Exception as exc:
            raise _unrecoverable(exc) from exc

    def stop(self, cold: bool = False) -> None:
        """Shutdown, once consuming stopped: the consumer's steps, then the worker's."""
        from celery import bootsteps

        if self.consumer.blueprint.state == bootsteps.RUN:
            self.consumer.blueprint.stop(self.consumer)
        self.worker.blueprint.stop(self.worker, terminate=cold)

    def shutdown(self) -> None:
        """The very end (Celery's ``on_stopped``): the timer, then the consumer steps'
        ``shutdown``."""
        self.timer.stop()
        self.consumer.blueprint.shutdown(self.consumer)

    # -- inspect stats -------------------------------------------------------------

    def worker_info(self) -> dict:
        """What the worker's steps' ``info`` returns, merged (Celery's ``stats``)."""
        return self.worker.blueprint.info(self.worker)

    def consumer_info(self) -> dict:
        return self.consumer.blueprint.info(self.consumer)

    # -- the consumer's steps (observer hooks) -----------------------------------

    def connected(self, broker: Any) -> None:
        """A connection is up and consuming: start the consumer's steps on it.

        A connection error propagates (the consumer treats the connection
        as lost, and starts them again on the next); anything else stops the
        worker with exit code 1, as Celery's.
        """
        self.consumer.connection = self._consumer.broker.connection
        try:
            self.consumer.blueprint.start(self.consumer)
        except tuple(self.consumer.connection_errors):
            self.consumer.blueprint.restart(self.consumer)
            raise
        except Exception as exc:
            _unrecoverable(exc)
            self._consumer.exitcode = 1
            self._consumer.should_stop = True

    def disconnected(self) -> None:
        """The connection was lost: stop the consumer's steps (Celery's
        ``blueprint.restart``; errors logged, the next step still stopped)."""
        self.requests.lost()
        self.consumer.blueprint.restart(self.consumer)

    def received(self, request: Any) -> None:
        self.requests.received(request)

    def started(self, request: Any) -> None:
        self.requests.started(request)

    def finished(self, request: Any, outcome: Any, decision: Any) -> None:
        self.requests.finished(request, outcome, decision)

    def revoked(self, request: Any, **kwargs: Any) -> None:
        self.requests.revoked(request, **kwargs)


def project_steps(app: Any, options: Any, pool: Any, consumer: Any) -> Optional[StepRunner]:
    """The runner of the project's own steps, or None when it has none."""
    steps = getattr(app, "steps", None) or {}
    if not steps.get("worker") and not steps.get("consumer"):
        return None
    return StepRunner(app, options, pool, consumer)
