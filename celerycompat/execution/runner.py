"""Run one task request inside a pool slot, with Celery's observable semantics.

The order of everything a project can observe is Celery's (wire contract B1,
B8, B39, D1): ``task_prerun``, ``loader.on_task_init``, STARTED (when
tracked), ``before_start``, the task body, then on success the link callbacks
and the next chain step are published *before* SUCCESS is stored (so
``children`` is right), then ``on_success``, ``task_success``, the log line,
``after_return``; on error the RETRY/FAILURE meta, ``on_retry``/``on_failure``,
the signal and the log line; finally ``task_postrun`` and the per-task cleanup
(``backend.process_cleanup``, ``loader.on_process_cleanup`` where the Django
fixup closes stale database connections).

The runner knows nothing of brokers: it returns an `Outcome` and the
consumer thread settles the message.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from billiard.einfo import ExceptionInfo
from celery import signals
from celery._state import _task_stack
from celery.app.task import Task
from celery.app.trace import task_has_custom
from celery.canvas import group, maybe_signature
from celery.exceptions import Ignore, Reject, Retry
from celery.utils.saferepr import saferepr
from celery.utils.serialization import get_pickleable_etype, get_pickleable_exception
from kombu.exceptions import EncodeError, OperationalError

from celerycompat.backends import group_commit, riding_acks
from celerycompat.celery_release import get_actual_ignore_result, reject_fails_task
from celerycompat.execution.context import build_context, request_dict
from celerycompat.execution.dedupe import Deduplicator
from celerycompat.execution.einfo import unwrap
from celerycompat.execution.outcome import Outcome, State
from celerycompat.execution.tracer import Tracers
from celerycompat.protocol.message import TaskMessage

logger = logging.getLogger("celery.app.trace")

LOG_SUCCESS = "Task %(name)s[%(id)s] succeeded in %(runtime)ss: %(return_value)s"
LOG_FAILURE = "Task %(name)s[%(id)s] %(description)s: %(exc)s"
LOG_RETRY = "Task %(name)s[%(id)s] retry: %(exc)s"
LOG_IGNORED = "Task %(name)s[%(id)s] %(description)s"
LOG_REJECTED = "Task %(name)s[%(id)s] %(exc)s"

#: Whether Reject(requeue=False) stores FAILURE, as Celery 5.7 does (celery_release).
REJECT_FAILS = reject_fails_task()


@dataclass(frozen=True)
class RunSettings:
    """What every run needs from the worker, fixed at startup."""

    hostname: str
    loglevel: int | None = None
    logfile: str | None = None


class TaskRunner:
    """Executes requests for one app. Thread-safe: pools call it concurrently.

    Args:
        app: the user's Celery app.
        store_for: ``(app, backend) -> ResultStore`` (`celerycompat.backends.result_store_for`).
        settings: worker-wide run settings.
    """

    def __init__(self, app: Any, settings: RunSettings,
                 store_for: Callable[[Any, Any], Any]) -> None:
        self.app = app
        self._store_for = store_for
        self._stores: dict[int, Any] = {}
        self.settings = settings
        self.loader = app.loader
        self.pid = os.getpid()
        self._info_enabled = logger.isEnabledFor(logging.INFO)
        self._hooks: dict[str, tuple[Callable | None, Callable | None, Callable | None,
                                     Callable]] = {}
        # Each task type's tracer comes out of celery.app.trace.build_tracer,
        # where Sentry's (and other) instrumentation hooks in (tracer.py).
        self._tracers = Tracers(app, settings.hostname)
        #: ``worker_deduplicate_successful_tasks`` (execution/dedupe.py).
        self._dedupe = Deduplicator(app)

    def for_new_process(self) -> TaskRunner:
        """A runner for a forked pool process: its own pid, stores and caches."""
        return self.with_stores(self._store_for)

    def with_stores(self, store_for: Callable[[Any, Any], Any]) -> TaskRunner:
        """A sibling runner (same app and settings) whose result stores come
        from ``store_for``: how a pool wraps every store (pools/deadlines.py)."""
        return type(self)(self.app, self.settings, store_for)

    @property
    def store_for(self) -> Callable[[Any, Any], Any]:
        """``(app, backend) -> ResultStore``: how this runner builds its stores."""
        return self._store_for

    # -- the task's own hooks, looked up once per task type -----------------

    def _task_hooks(self, task: Task):
        hooks = self._hooks.get(task.name)
        if hooks is None:
            # Celery's own test, so a task with a custom ``__call__`` (or the
            # worker's stack-protected one) is entered exactly as Celery does.
            hooks = (
                task.before_start if task_has_custom(task, "before_start") else None,
                task.on_success if task_has_custom(task, "on_success") else None,
                task.after_return if task_has_custom(task, "after_return") else None,
                task if task_has_custom(task, "__call__") else task.run,
            )
            self._hooks[task.name] = hooks
        return hooks

    def store(self, task: Task) -> Any:
        """The result store for ``task.backend``.

        ``app.backend`` is per thread in Celery (and a task may name its own
        backend), so the store follows the backend object the task would use.
        """
        backend = task.backend
        store = self._stores.get(id(backend))
        if store is None or store.backend is not backend:
            store = self._stores[id(backend)] = self._store_for(self.app, backend)
        return store

    # -- one run ---------------------------------------------------------------

    def run(self, task: Task, message: TaskMessage) -> Outcome:
        """Run ``message`` with ``task``; never raises for task errors.

        A SUCCESS write the store deferred (group commit) comes back as
        ``outcome.durable``: the consumer settles the message once it is done.
        """
        ticket = message.ack_ticket
        if ticket is None:
            outcome = self._run(task, message)
        else:
            # Before anything of the run: Celery acks an early-ack message
            # before the task starts (backends/riding_acks.py).
            ride = getattr(self.store(task), "ride", None)
            if ride is not None:
                ride(ticket)
            try:
                outcome = self._run(task, message)
            finally:
                riding_acks.begin(None)
        outcome.durable = group_commit.take()
        return outcome

    def _run(self, task: Task, message: TaskMessage) -> Outcome:
        started = time.monotonic()
        context = None
        try:
            req = request_dict(
                message, hostname=self.settings.hostname,
                loglevel=self.settings.loglevel, logfile=self.settings.logfile,
            )
            context = build_context(message, req)
            if self._dedupe.enabled:
                duplicate = self._dedupe.check(
                    task, context, self._name(task, context),
                    lambda retval: self._dispatch_callbacks_and_chain(
                        task, context, message, retval))
                if duplicate is not None:
                    return duplicate
            outcome = self._tracers.run(task, self._trace, message, req, context, started)
            if outcome.state is State.REJECTED and not outcome.requeue and REJECT_FAILS:
                # Celery records this after the trace (task_postrun first),
                # in the worker's handling of the rejection.
                ignore_result = get_actual_ignore_result(task, context)
                self._store_reject(task, context, outcome.retval, ignore_result)
            return outcome
        except (MemoryError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a failure outside the task body
            return self._internal_error(task, message, context, exc)

    def _trace(self, task: Task, message: TaskMessage, context: Any,
               started: float) -> Outcome:
        before_start, on_success, after_return, fun = self._task_hooks(task)
        # The task's own code that runs after its result is stored (Celery's
        # order) sees it stored: such a task's SUCCESS is not deferred.
        group_commit.allow_deferring(on_success is None and after_return is None)
        task_id, args, kwargs = message.id, message.args, message.kwargs
        ignore_result = get_actual_ignore_result(task, context)
        store_result = not ignore_result
        state: State | None = None
        retval: Any = None
        outcome: Outcome

        _task_stack.push(task)
        task.request_stack.push(context)
        try:
            if signals.task_prerun.receivers:
                signals.task_prerun.send(sender=task, task_id=task_id, task=task,
                                         args=args, kwargs=kwargs)
            self.loader.on_task_init(task_id, task)
            if task.track_started and store_result:
                self.store(task).mark_as_started(
                    task_id, {"pid": self.pid, "hostname": self.settings.hostname},
                    context,
                )
            try:
                if before_start is not None:
                    before_start(task_id, args, kwargs)
                retval = fun(*args, **kwargs)
            except Reject as exc:
                einfo = ExceptionInfo(internal=True)
                self._log_error(task, context, einfo, exc)
                outcome = Outcome(State.REJECTED, exc, requeue=bool(exc.requeue),
                                  exception_repr=saferepr(exc), traceback=einfo.traceback)
            except Ignore as exc:
                self._log_error(task, context, ExceptionInfo(internal=True), exc)
                outcome = Outcome(State.IGNORED, exc)
            except Retry as exc:
                outcome = self._on_retry(task, context, exc, ignore_result)
            except Exception as exc:
                outcome = self._on_failure(task, context, exc, ignore_result)
            else:
                outcome = self._on_success(task, message, context, retval,
                                           store_result, started, on_success)
            state = outcome.state
            retval = outcome.retval
            if state not in (State.REJECTED, State.IGNORED) and after_return is not None:
                try:
                    after_return(state.value, retval, task_id, args, kwargs, None)
                except (Reject, MemoryError):
                    raise
                except Exception as exc:
                    logger.exception("Task %s[%s] after_return handler raised: %r",
                                     self._name(task, context), task_id, exc)
        finally:
            try:
                if signals.task_postrun.receivers:
                    signals.task_postrun.send(
                        sender=task, task_id=task_id, task=task, args=args, kwargs=kwargs,
                        retval=retval, state=state.value if state is not None else None,
                    )
            finally:
                _task_stack.pop()
                task.request_stack.pop()
                self._cleanup(task)
        return outcome

    def _cleanup(self, task: Task) -> None:
        try:
            task.backend.process_cleanup()
            self.loader.on_process_cleanup()
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as exc:
            logger.error("Process cleanup failed: %r", exc, exc_info=True)

    # -- success ---------------------------------------------------------------

    def _on_success(self, task: Task, message: TaskMessage, context: Any, retval: Any,
                    store_result: bool, started: float,
                    on_success: Callable | None) -> Outcome:
        callbacks_sent = False
        try:
            self._dispatch_callbacks_and_chain(task, context, message, retval)
            callbacks_sent = True
            self.store(task).mark_as_done(message.id, retval, context, store_result)
        except (EncodeError, OperationalError) as exc:
            if callbacks_sent and isinstance(exc, OperationalError):
                raise
            return self._on_failure(task, context, exc, not store_result)
        runtime = time.monotonic() - started
        if on_success is not None:
            try:
                on_success(retval, message.id, message.args, message.kwargs)
            except (Reject, MemoryError):
                raise
            except Exception as exc:
                # The outcome is stored already: a second, failed outcome
                # would fire errbacks for a task that succeeded.
                logger.exception("Task %s[%s] on_success handler raised: %r",
                                 self._name(task, context), message.id, exc)
        if signals.task_success.receivers:
            signals.task_success.send(sender=task, result=retval, runtime=runtime)
        result_repr = saferepr(retval, task.resultrepr_maxsize)
        if self._info_enabled:
            data = {
                "id": message.id,
                "name": self._name(task, context),
                "return_value": result_repr,
                "runtime": runtime,
                "args": context.get("argsrepr") or saferepr(message.args),
                "kwargs": context.get("kwargsrepr") or saferepr(message.kwargs),
            }
            logger.info(LOG_SUCCESS, data, extra={"data": data})
        self._dedupe.remember(task, message.id)
        return Outcome(State.SUCCESS, retval, runtime, result_repr=result_repr)

    def _dispatch_callbacks_and_chain(self, task: Task, context: Any,
                                      message: TaskMessage, retval: Any) -> None:
        """Publish ``link`` callbacks and the next chain step (D1, D2)."""
        callbacks = context.callbacks
        chain = context.chain
        if not callbacks and not chain:
            return
        app = self.app
        options = {
            "parent_id": message.id,
            "root_id": context.root_id or message.id,
            "priority": (context.delivery_info or {}).get("priority")
            if app.conf.task_inherit_parent_priority else None,
        }
        publish = getattr(app.amqp, "_retry_publish", None) or (
            lambda fn, *a, **kw: fn(*a, **kw))
        if callbacks:
            if len(callbacks) == 1:
                publish(maybe_signature(callbacks[0], app=app).apply_async,
                        (retval,), **options)
            else:
                plain = []
                for sig in callbacks:
                    sig = maybe_signature(sig, app=app)
                    if isinstance(sig, group):
                        publish(sig.apply_async, (retval,), **options)
                    else:
                        plain.append(sig)
                if plain:
                    publish(group(plain, app=app).apply_async, (retval,), **options)
        if chain:
            publish(maybe_signature(chain[-1], app=app).apply_async, (retval,),
                    chain=chain[:-1], **options)

    # -- errors ----------------------------------------------------------------

    def _store_errors(self, task: Task, ignore_result: bool) -> bool:
        return task.store_errors_even_if_ignored if ignore_result else True

    def _on_retry(self, task: Task, context: Any, exc: Retry, ignore_result: bool) -> Outcome:
        einfo = ExceptionInfo(sys.exc_info())
        if self._store_errors(task, ignore_result):
            self.store(task).mark_as_retry(context.id, exc.exc, einfo.traceback, context)
        task.on_retry(exc.exc, context.id, context.args, context.kwargs, einfo)
        signals.task_retry.send(sender=task, request=context, reason=exc, einfo=einfo)
        data = {"id": context.id, "name": self._name(task, context), "exc": str(exc)}
        logger.info(LOG_RETRY, data)
        return Outcome(State.RETRY, exc, exception_repr=saferepr(exc.exc),
                       traceback=einfo.traceback)

    def _on_failure(self, task: Task, context: Any, orig_exc: BaseException,
                    ignore_result: bool, *, internal: bool = False) -> Outcome:
        exc = get_pickleable_exception(orig_exc)
        if exc.__traceback__ is None:
            exc.__traceback__ = sys.exc_info()[2]
        exc_type = get_pickleable_etype(type(orig_exc))
        einfo = ExceptionInfo(exc_info=(exc_type, exc, exc.__traceback__), internal=internal)
        self.store(task).mark_as_failure(
            context.id, exc, einfo.traceback, context,
            store_result=self._store_errors(task, ignore_result),
            call_errbacks=True,
        )
        task.on_failure(exc, context.id, context.args, context.kwargs, einfo)
        signals.task_failure.send(sender=task, task_id=context.id, exception=exc,
                                  args=context.args, kwargs=context.kwargs,
                                  traceback=exc.__traceback__, einfo=einfo)
        self._log_error(task, context, einfo, exc)
        return Outcome(State.INTERNAL_ERROR if internal else State.FAILURE, exc,
                       exception_repr=saferepr(exc), traceback=einfo.traceback)

    def _store_reject(self, task: Task, context: Any, exc: Reject, ignore_result: bool) -> None:
        """Reject(requeue=False) is a terminal FAILURE in 5.7 (B8), with no traceback."""
        self.store(task).mark_as_failure(context.id, exc, None, context,
                                   store_result=self._store_errors(task, ignore_result),
                                   call_errbacks=True)
        signals.task_failure.send(sender=task, task_id=context.id, exception=exc,
                                  args=context.args, kwargs=context.kwargs,
                                  traceback=None, einfo=None)

    def _internal_error(self, task: Task, message: TaskMessage, context: Any,
                        exc: Exception) -> Outcome:
        """An error in the machinery around the task (not in its body)."""
        einfo = ExceptionInfo(internal=True)
        signals.task_internal_error.send(
            sender=task, task_id=message.id, args=message.args, kwargs=message.kwargs,
            request=message.request, exception=exc, traceback=einfo.tb, einfo=einfo)
        if context is None:
            logger.critical("Task %s[%s] INTERNAL ERROR: %r", message.name, message.id, exc,
                            exc_info=True)
            return Outcome(State.INTERNAL_ERROR, exc)
        ignore_result = get_actual_ignore_result(task, context)
        return self._on_failure(task, context, exc, ignore_result, internal=True)

    # -- logging ---------------------------------------------------------------

    @staticmethod
    def _name(task: Task, context: Any) -> str:
        return getattr(context, "shadow", None) or task.name

    def _log_error(self, task: Task, context: Any, einfo: ExceptionInfo,
                   exc: BaseException) -> None:
        """Celery's log policies: rejected, ignored, expected, unexpected, internal."""
        name = self._name(task, context)
        if isinstance(exc, Reject):
            level, fmt, description, with_tb = logging.WARNING, LOG_REJECTED, "rejected", True
        elif isinstance(exc, Ignore):
            level, fmt, description, with_tb = logging.INFO, LOG_IGNORED, "ignored", False
        elif einfo.internal:
            level, fmt, description, with_tb = (logging.CRITICAL, LOG_FAILURE,
                                                "INTERNAL ERROR", True)
        elif task.throws and isinstance(exc, task.throws):
            level, fmt, description, with_tb = (logging.INFO, LOG_FAILURE,
                                                "raised expected", False)
        else:
            level, fmt, description, with_tb = (logging.ERROR, LOG_FAILURE,
                                                "raised unexpected", True)
        data = {
            "hostname": context.hostname,
            "id": context.id,
            "name": name,
            "exc": saferepr(exc),
            "traceback": einfo.traceback,
            "args": context.get("argsrepr") or saferepr(context.args),
            "kwargs": context.get("kwargsrepr") or saferepr(context.kwargs),
            "description": description,
            "internal": einfo.internal,
        }
        # billiard wraps the exception to carry its traceback across processes;
        # the log line shows the task's own exception, as Celery's does.
        einfo.exception = unwrap(einfo.exception)
        exc_info = einfo.exc_info if with_tb and einfo.exc_info and einfo.exc_info[0] else None
        logger.log(level, fmt, data, exc_info=exc_info, extra={"data": data})

