"""A task's own ``Request`` class (``Task.Request = 'proj.requests:MyRequest'``).

Celery's worker makes one object of the task's ``Request`` class per
message and hands its methods to the pool as callbacks: ``on_accepted``
when a pool slot takes the task, ``on_success`` when it is over (which calls
``on_failure`` for an exception, which calls ``on_retry`` for a retry),
``on_timeout`` at the soft and the hard limit, ``on_failure`` when the
process running it is lost or terminated. Projects subclass it to log or
count those moments (the Celery docs' example logs from ``on_timeout``).

ccworker already does the work Celery's base methods do (acks, results,
events, the log lines), in its own places. So the object it makes is of a
class whose bases are the project's class, then `CeleryCallGraph`, then
Celery's ``Request``: the project's methods run with every attribute
Celery's object has (``self.task``, ``self.id``, ``self.args``,
``self.request_dict``...), and when they call ``super()`` they reach
`CeleryCallGraph`, which makes the calls Celery's base methods make to
each other and to ``acknowledge``/``reject`` (so an override of those is
called where Celery calls it) and does nothing else. As in Celery, the
class's ``on_success`` is replaced by the one ``create_request_cls`` builds,
so a project's ``on_success`` override is not called.

The hooks are called on the consumer's thread (prefork: the parent, as in
Celery), after ccworker has done the base work for that moment; an
exception a hook raises is logged as billiard logs a failing pool callback
and changes nothing else. The soft limit is reported by the pool's timer
(`celerycompat.pools.base.soft_limit_exceeded`), the moment it is logged.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from typing import Any

from billiard import einfo as billiard_einfo
from billiard.einfo import ExceptionInfo
from billiard.exceptions import Terminated, TimeLimitExceeded, WorkerLostError
from celery.exceptions import Ignore, Reject, Retry
from celery.worker.request import Request as CeleryRequest

from celerycompat.celery_release import request_hook_rules
from celerycompat.execution.context import own_request_class
from celerycompat.execution.outcome import Outcome, Settle, State
from celerycompat.pools import base as pool_base

logger = logging.getLogger("celery.worker.request")
#: billiard's logger, where Celery's prefork pool reports a failing callback.
callback_logger = logging.getLogger("multiprocessing")

_FAILED = (State.FAILURE, State.RETRY, State.REJECTED, State.IGNORED, State.INTERNAL_ERROR)


UNWRAPS, TIMEOUT_REQUEUES, SPLIT_FLAGS = request_hook_rules()
#: billiard's wrapper of an exception made in this process (billiard >= 4:
#: Celery 5.3+); older releases' ``ExceptionInfo`` holds the exception itself.
WRAPPER: Any = getattr(billiard_einfo, "ExceptionWithTraceback", ())


def _ack_flag(task: Any, name: str) -> bool:
    """``acks_on_timeout``/``acks_on_failure`` (5.7) or, before, the
    ``acks_on_failure_or_timeout`` they replace."""
    value = getattr(task, name, None) if SPLIT_FLAGS else None
    if value is None:
        value = getattr(task, "acks_on_failure_or_timeout", True)
    return bool(value)


class CeleryCallGraph(CeleryRequest):
    """Celery's ``Request`` hooks without their work: only the calls they make.

    What Celery's base methods do (acks, results, events, log lines) ccworker
    has done already; what a project's override may rely on is that its
    ``super()`` call goes on to the hooks Celery's would call, as the
    installed release's would (`celery_release.request_hook_rules`).
    """

    def on_accepted(self, pid: Any, time_accepted: float) -> None:
        self.worker_pid = pid
        self.time_start = time.time() - (time.monotonic() - time_accepted)
        if not self.task.acks_late:
            self.acknowledge()

    def on_timeout(self, soft: bool, timeout: Any) -> None:
        if soft or not self.task.acks_late:
            return
        if _ack_flag(self.task, "acks_on_timeout"):
            self.acknowledge()
        elif SPLIT_FLAGS:
            self.reject(requeue=True)

    def on_retry(self, exc_info: Any) -> None:
        if self.task.acks_late:
            self.acknowledge()

    def on_failure(self, exc_info: Any, send_failed_event: bool = True,
                   return_ok: bool = False) -> Any:
        exc = exc_info.exception
        if UNWRAPS and isinstance(exc, WRAPPER):
            exc = exc.exc
        if isinstance(exc, (Terminated, SystemExit, KeyboardInterrupt)):
            return None
        if isinstance(exc, Reject):
            return self.reject(requeue=exc.requeue)
        if isinstance(exc, Ignore):
            return self.acknowledge()
        if isinstance(exc, Retry):
            return self.on_retry(exc_info)
        if self.task.acks_late:
            is_timeout = isinstance(exc, TimeLimitExceeded)
            acks = _ack_flag(self.task, "acks_on_timeout" if is_timeout else "acks_on_failure")
            if (self.task.reject_on_worker_lost and isinstance(exc, WorkerLostError)) \
                    or (TIMEOUT_REQUEUES and is_timeout and not acks):
                self.reject(requeue=True)
            elif acks:
                self.acknowledge()
            else:
                self.reject(requeue=False)
        return None

    def acknowledge(self) -> None:
        self.acknowledged = True

    def reject(self, requeue: bool = False) -> None:
        self.acknowledged = True

    def send_event(self, type: str, **fields: Any) -> None:
        """ccworker's consumer sends the task events."""


def _on_success(self: Any, failed__retval__runtime: Any, **kwargs: Any) -> Any:
    """The ``on_success`` Celery's ``create_request_cls`` puts over the class's own."""
    failed, retval, _runtime = failed__retval__runtime
    if failed:
        return self.on_failure(retval, return_ok=True)
    if self.task.acks_late:
        self.acknowledge()
    return None


_composed: dict[type, type] = {}


def composed_class(own: type) -> type:
    """The class ccworker instantiates for a task whose ``Request`` is ``own``."""
    cls = _composed.get(own)
    if cls is None:
        bases = (own,) if issubclass(own, CeleryCallGraph) else (own, CeleryCallGraph)
        cls = _composed[own] = type("Request", bases, {
            "on_success": _on_success,
            "__module__": own.__module__,
            "__qualname__": "create_request_cls.<locals>.Request",
        })
    return cls


def _einfo(exc: BaseException, traceback: str | None = None, *,
           from_child: bool = False) -> ExceptionInfo:
    """billiard's ``ExceptionInfo`` for ``exc``, as Celery's hooks get it.

    Made in this process, its ``exception`` is billiard's
    ``ExceptionWithTraceback`` around ``exc`` (``.exc``); one that came from a
    prefork child was unpickled, which unwraps it: ``exc`` itself.
    ``traceback``: the text of the original traceback, where known.
    """
    if exc.__traceback__ is None:
        try:
            raise exc
        except BaseException:  # noqa: BLE001 - any exception: it is ours
            einfo = ExceptionInfo()
        exc.__traceback__ = None
    else:
        einfo = ExceptionInfo((type(exc), exc, exc.__traceback__))
    if traceback:
        einfo.traceback = traceback
    if from_child:
        einfo.exception = exc
    return einfo


def _guarded(method: Any) -> Any:
    """A hook of the observer: whatever it or the project's code raises is
    logged as billiard logs a failing pool callback; the consumer goes on."""

    @functools.wraps(method)
    def guarded(*args: Any, **kwargs: Any) -> None:
        try:
            method(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - billiard's safe_apply_callback
            callback_logger.error("Pool callback raised exception: %r", exc, exc_info=True)

    return guarded


def _accepted_at(request: Any) -> float:
    """When the pool took ``request``, on the monotonic clock ``on_accepted``
    expects (the consumer keeps it as ``time_start``, wall-clock)."""
    return time.monotonic() - (time.time() - request.time_start)


class ProjectRequests:
    """Makes the project's request objects and calls their hooks (a consumer observer)."""

    def __init__(self, app: Any, pool: Any, pool_name: str) -> None:
        self.app = app
        self.pool = pool
        #: Celery's prefork pool reports a hard limit twice (``on_failure``,
        #: then ``on_timeout``); its gevent pool, and ours in-process, once.
        self.failure_before_timeout = pool_name == "prefork"
        self._classes: dict[str, type | None] = {}
        self._running: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._not_accepted: weakref.WeakSet[Any] = weakref.WeakSet()
        pool_base.soft_limit_listeners.append(self.soft_limit)

    def close(self) -> None:
        """Stop hearing the pools' soft limits."""
        try:
            pool_base.soft_limit_listeners.remove(self.soft_limit)
        except ValueError:
            pass

    def _class_for(self, task: Any) -> type | None:
        name = task.name
        if name not in self._classes:
            own = own_request_class(task)
            self._classes[name] = composed_class(own) if own is not None else None
        return self._classes[name]

    # -- consumer hooks (consumer/observers.py) -------------------------------------

    @_guarded
    def received(self, request: Any) -> None:
        cls = self._class_for(request.task)
        if cls is None:
            return
        message = request.message
        try:
            request.project_request = cls(
                request.delivery, app=self.app, hostname=message.request.get("hostname"),
                task=request.task,
                body=(message.args, message.kwargs, dict(message.embed)),
                headers=message.request, decoded=True, utc=message.utc)
        except Exception as exc:  # noqa: BLE001 - the project's constructor
            logger.error("%s[%s]: its Request class could not be made: %r",
                         message.name, message.id, exc, exc_info=True)

    @_guarded
    def started(self, request: Any) -> None:
        own = request.project_request
        if own is None:
            return
        self._running[request.id] = request
        pid = self.pool.pid_for(request.id)
        if pid is None:
            # A prefork child has not taken it yet: at the next turn.
            self._not_accepted.add(request)
        else:
            self._call(own.on_accepted, pid, _accepted_at(request))

    @_guarded
    def turned(self) -> None:
        for request in list(self._not_accepted):
            pid = self.pool.pid_for(request.id)
            if pid is not None:
                self._accept(request, pid)

    def _accept(self, request: Any, pid: Any) -> None:
        if request in self._not_accepted:
            self._not_accepted.discard(request)
            self._call(request.project_request.on_accepted, pid, _accepted_at(request))

    @_guarded
    def finished(self, request: Any, outcome: Outcome, decision: Settle) -> None:
        own = request.project_request
        if own is None:
            return
        self._accept(request, outcome.pid)
        self._running.pop(request.id, None)
        exc = outcome.retval if isinstance(outcome.retval, BaseException) else None
        if outcome.is_timeout:
            exc = exc if isinstance(exc, TimeLimitExceeded) else TimeLimitExceeded()
            if self.failure_before_timeout:
                self._call(own.on_failure, _einfo(exc, outcome.traceback))
            self._call(own.on_timeout, False, exc.args[0] if exc.args else None)
        elif outcome.is_worker_lost:
            lost = exc if exc is not None else WorkerLostError(outcome.exception_repr or "")
            self._call(own.on_failure, _einfo(lost, outcome.traceback))
        elif outcome.state is State.SUCCESS:
            self._call(own.on_success, (False, outcome.result_repr, outcome.runtime))
        elif outcome.state in _FAILED:
            if exc is None:  # it did not survive the trip from a child process
                exc = Exception(outcome.exception_repr)
            einfo = _einfo(exc, outcome.traceback, from_child=outcome.pid is not None)
            self._call(own.on_success, (True, einfo, outcome.runtime))

    @_guarded
    def revoked(self, request: Any, *, terminated: bool = False, signum: Any = None,
                expired: bool = False) -> None:
        own = request.project_request
        if own is None:
            return
        self._call(own.acknowledge)  # as Celery's ``_announce_revoked``
        if not terminated:
            return
        self._accept(request, None)
        self._running.pop(request.id, None)
        # billiard: ``_set_terminated(exitcode)`` of the child the signal killed.
        self._call(own.on_failure, _einfo(Terminated(int(signum or 0))))

    @_guarded
    def soft_limit(self, message: Any, soft: Any) -> None:
        """A pool's soft limit fired for ``message`` (on the pool's timer thread)."""
        request = self._running.get(message.id)
        own = getattr(request, "project_request", None)
        if own is not None:
            self._call(own.on_timeout, True, soft)

    _call = staticmethod(_guarded(lambda hook, *args: hook(*args)))


def project_requests(app: Any, pool: Any, pool_name: str) -> ProjectRequests | None:
    """The observer for the app's tasks with their own ``Request`` class, or None."""
    tasks = [task for name, task in app.tasks.items() if not name.startswith("celery.")]
    if not any(own_request_class(task) is not None for task in tasks):
        return None
    return ProjectRequests(app, pool, pool_name)
