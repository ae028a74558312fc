"""Each task's tracer comes from ``celery.app.trace.build_tracer``, so instrumentation sees it.

Monitoring libraries hook Celery's worker at the function that builds a
task's tracer: sentry-sdk's Celery integration (and New Relic's agent)
replace ``celery.app.trace.build_tracer`` with a wrapper that, for each task
type, first patches the task's ``run``/``__call__`` (to capture exceptions
and open a span), then calls the function it replaced and wraps the tracer
it returns (an isolation scope with the task's tags, a transaction continued
from the message headers, around the whole run). A worker that never calls
``build_tracer`` gets none of it: no events, no transactions.

ccworker runs tasks with its own tracer (:class:`~celerycompat.execution.runner.TaskRunner`),
so it makes that tracer come out of ``build_tracer``:

* :func:`install` puts a factory in ``celery.app.trace.build_tracer``
  *before* the project is imported (:mod:`celerycompat.cli`), so a wrapper
  installed by the project (``sentry_sdk.init`` in its ``celery.py``) wraps
  the factory. Called by anyone else (``Task.apply`` for eager runs), the
  factory is Celery's own ``build_tracer``, unchanged.
* :class:`Tracers` builds each task type's tracer once per runner (so once
  per pool process, as Celery does) by calling whatever
  ``celery.app.trace.build_tracer`` is now, with Celery's arguments. While
  it does, the factory returns ccworker's tracer, so what comes back is
  ccworker's tracer inside every wrapper, and the task was patched before
  ccworker looks up its ``run``.
* A run calls that tracer with Celery's tracer arguments
  ``(task_id, args, kwargs, request_dict)``; the wrappers read them as they
  do under Celery. The run's own state goes beside them in a thread-local.

If something replaced ``build_tracer`` before :func:`install` (an agent
started ahead of ccworker), ccworker cannot be beneath it: the wrapper's
task patches are still applied (the build is still called), its returned
tracer, which would run Celery's, is not used.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import celery.app.trace as celery_trace

logger = logging.getLogger("celery.worker")

#: Celery's own function, as found when this module was first imported.
_celery_build_tracer = celery_trace.build_tracer

_local = threading.local()


def _factory(name: Any, task: Any, *args: Any, **kwargs: Any) -> Any:
    """``celery.app.trace.build_tracer`` while ccworker runs: ccworker's tracer
    when :class:`Tracers` asks for it, Celery's otherwise."""
    ours = getattr(_local, "building", None)
    if ours is None:
        return _celery_build_tracer(name, task, *args, **kwargs)
    _local.reached = True
    return ours


_factory.__name__ = "build_tracer"
_factory.__qualname__ = "build_tracer"


def install() -> bool:
    """Make ``celery.app.trace.build_tracer`` the factory (idempotent).

    Returns whether ccworker's tracers will be built inside any wrapper
    installed from now on (``False``: something replaced Celery's function
    first, see the module docstring).
    """
    current = celery_trace.build_tracer
    if current is _factory:
        return True
    if current is not _celery_build_tracer:
        logger.debug("celery.app.trace.build_tracer was replaced before ccworker started "
                     "(%r): its task patches apply, its tracer wrapper does not", current)
        return False
    celery_trace.build_tracer = _factory
    return True


#: ``trace(task, message, context, started) -> Outcome``: the runner's own tracer.
TraceFn = Callable[[Any, Any, Any, float], Any]


class Tracers:
    """The tracer of each task type for one runner, built through ``build_tracer``."""

    def __init__(self, app: Any, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self._built: dict[str, Callable[..., Any]] = {}

    def run(self, task: Any, trace: TraceFn, message: Any, request: dict,
            context: Any, started: float) -> Any:
        """Run ``message`` through ``task``'s tracer (built on first use)."""
        tracer = self._built.get(task.name)
        if tracer is None:
            tracer = self._built[task.name] = self._build(task, trace)
        outer = getattr(_local, "run", None)
        _local.run = (message, context, started)
        try:
            return tracer(message.id, message.args, message.kwargs, request)
        finally:
            _local.run = outer

    def _build(self, task: Any, trace: TraceFn) -> Callable[..., Any]:
        def ccworker_tracer(uuid: Any, args: Any, kwargs: Any, request: Any = None) -> Any:
            message, context, started = _local.run
            return trace(task, message, context, started)

        _local.building, _local.reached = ccworker_tracer, False
        try:
            # Celery's worker builds with these arguments (celery.app.trace).
            built = celery_trace.build_tracer(task.name, task, self.app.loader, self.hostname,
                                              app=self.app)
            reached = _local.reached
        except Exception:
            logger.warning("Building the tracer of %s through %r failed; running it "
                           "without tracer instrumentation", task.name,
                           celery_trace.build_tracer, exc_info=True)
            return ccworker_tracer
        finally:
            _local.building = None
        return built if reached else ccworker_tracer
