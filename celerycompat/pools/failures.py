"""Outcomes the prefork *parent* records, because the child cannot.

A child that is killed (SIGKILL, OOM, a segfault, ``os._exit``) or that the
parent kills at the hard time limit never reports; Celery's worker then
stores the outcome from the main process. These functions do what
``celery/worker/request.py`` does there, in its order, and return the
`Outcome` the consumer settles the message with:

* `worker_lost`: ``Request.on_failure`` for a ``WorkerLostError`` (wire
  contract B9): SUCCESS already stored -> treated as success;
  ``retry_on_worker_lost`` with retries left -> a retry is published and
  RETRY stored; ``acks_late`` + ``reject_on_worker_lost`` -> requeued and
  nothing stored; otherwise FAILURE stored (no traceback in the meta, as
  Celery's ``mark_as_failure`` call passes none), ``task_failure`` sent and
  "Task handler raised error" logged.
* `hard_time_limit`: ``Request.on_timeout(soft=False)`` (B23): the
  "Hard time limit (Ns) exceeded" line, FAILURE ``TimeLimitExceeded(N)``
  stored, ``on_failure``, ``after_return``, ``task_failure``. Celery runs
  its failure path a second time for the same job (the pool's error
  callback); we run it once, and only keep that second path's log line.
* `refused`: a job that could not be sent to a child at all.
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionInfo
from billiard.exceptions import TimeLimitExceeded, WorkerLostError
from celery import signals, states
from celery.app.trace import task_has_custom
from celery.exceptions import Retry
from celery.utils.saferepr import saferepr

from celerycompat.celery_release import get_actual_ignore_result
from celerycompat.execution.context import build_context, request_dict
from celerycompat.execution.einfo import unwrap
from celerycompat.execution.outcome import Outcome, State

logger = logging.getLogger("celery.worker.request")


def context_for(runner: Any, message: Any) -> Any:
    """The ``task.request`` Celery's worker Request holds for this message."""
    settings = runner.settings
    return build_context(message, request_dict(
        message, hostname=settings.hostname, loglevel=settings.loglevel,
        logfile=settings.logfile))


def _einfo(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except type(exc):
        return ExceptionInfo()


def _store_errors(task: Any, context: Any) -> tuple[bool, bool]:
    """``(ignore_result, store_errors)`` as ``Request`` computes them."""
    ignore_result = bool(get_actual_ignore_result(task, context))
    return ignore_result, (not ignore_result or bool(task.store_errors_even_if_ignored))


def success_was_stored(task: Any, task_id: str, ignore_result: bool) -> Any:
    """``Request._success_was_stored``: the stored SUCCESS meta, or False."""
    if ignore_result:
        return False
    backend = task.backend
    as_uri = getattr(backend, "as_uri", None)
    try:
        if callable(as_uri) and as_uri() == "rpc://":
            return False
        configured = getattr(backend, "max_retries", 3)
        bounded = min(configured, 3) if isinstance(configured, (int, float)) else 3
        ensure = getattr(backend, "_ensure_retryable", None)
        if ensure is not None:
            from celery.exceptions import BackendGetMetaError

            meta = ensure(backend._get_task_meta_for, fallback_exc=BackendGetMetaError,
                          fallback_msg="failed to get meta", task_id=task_id,
                          max_retries=bounded)
        else:  # Celery < 5.5
            meta = backend._get_task_meta_for(task_id)
        return meta if meta["status"] == states.SUCCESS else False
    except Exception:
        return False


def worker_lost(runner: Any, task: Any, message: Any, text: str) -> Outcome:
    """The child running ``message`` is gone; ``text`` is the WorkerLostError message."""
    einfo = _einfo(WorkerLostError(text))
    exc = unwrap(einfo.exception)
    context = context_for(runner, message)
    ignore_result, store_errors = _store_errors(task, context)
    name = message.name

    success_meta = success_was_stored(task, message.id, ignore_result)
    if success_meta:
        logger.warning("Task %s[%s] succeeded before the worker was lost: %r",
                       name, message.id, exc)
        return Outcome(State.SUCCESS, is_worker_lost=True,
                       result_repr=saferepr(success_meta.get("result"),
                                            task.resultrepr_maxsize))

    max_retries_exceeded = False
    if getattr(task, "retry_on_worker_lost", False):
        max_retries = task.max_retries
        max_retries_exceeded = (max_retries is not None
                                and (context.retries or 0) >= max_retries)
        if not max_retries_exceeded and _retry(runner, task, message, context, exc,
                                               einfo, store_errors):
            return Outcome(State.RETRY, is_worker_lost=True, exception_repr=saferepr(exc),
                           traceback=einfo.traceback)

    requeue = bool(task.acks_late and task.reject_on_worker_lost
                   and not max_retries_exceeded)
    if not requeue:
        runner.store(task).mark_as_failure(message.id, exc, None, context,
                                           store_result=store_errors, call_errbacks=True)
        task.request_stack.push(context)
        try:
            signals.task_failure.send(sender=task, task_id=message.id, exception=exc,
                                      args=message.args, kwargs=message.kwargs,
                                      traceback=einfo.traceback, einfo=einfo)
        finally:
            task.request_stack.pop()
    logger.error("Task handler raised error: %r", exc, exc_info=einfo.exc_info)
    return Outcome(State.FAILURE, exc, is_worker_lost=True, requeue=requeue,
                   exception_repr=saferepr(exc), traceback=einfo.traceback)


def _retry(runner: Any, task: Any, message: Any, context: Any, exc: BaseException,
           einfo: ExceptionInfo, store_errors: bool) -> bool:
    """``Request._retry_worker_lost``: publish the retry, store RETRY. False if not sent."""
    countdown = task.default_retry_delay
    try:
        task.signature_from_request(context, countdown=countdown,
                                    retries=(context.retries or 0) + 1).apply_async()
    except Exception as send_exc:
        logger.error("Failed to retry task %s[%s] after worker was lost: %r",
                     message.task, message.id, send_exc, exc_info=True)
        return False
    if store_errors:
        runner.store(task).mark_as_retry(message.id, exc, einfo.traceback, context)
    reason = Retry(exc=exc, when=countdown)
    task.request_stack.push(context)
    try:
        task.on_retry(exc, message.id, message.args, message.kwargs, einfo)
        signals.task_retry.send(sender=task, request=context, reason=reason, einfo=einfo)
    finally:
        task.request_stack.pop()
    logger.info("Task %s[%s] retry: %s", message.task, message.id, reason)
    return True


def hard_time_limit(runner: Any, task: Any, message: Any, timeout: Any, *,
                    handler_line: bool = True) -> Outcome:
    """The parent killed the child at the hard limit ``timeout`` (seconds, as given).

    ``handler_line=False``: without prefork's "Task handler raised error"
    line (Celery's gevent pool, which has no second pass, does not log it).
    """
    exc = TimeLimitExceeded(timeout)
    context = context_for(runner, message)
    _, store_errors = _store_errors(task, context)
    einfo = _einfo(exc)
    if handler_line:
        # The line Celery's second pass (the pool's error callback) logs first.
        logger.error("Task handler raised error: %r", exc, exc_info=einfo.exc_info)
    logger.error("Hard time limit (%ss) exceeded for %s[%s]", timeout, message.name,
                 message.id)
    try:
        runner.store(task).mark_as_failure(message.id, exc, None, context,
                                           store_result=store_errors, call_errbacks=True)
        task.on_failure(exc, message.id, message.args, message.kwargs, einfo)
        if task_has_custom(task, "after_return"):
            task.after_return(states.FAILURE, exc, message.id, message.args,
                              message.kwargs, None)
        signals.task_failure.send(sender=task, task_id=message.id, exception=exc,
                                  args=message.args, kwargs=message.kwargs,
                                  traceback=exc.__traceback__, einfo=einfo)
    finally:
        exc.__traceback__ = None
    return Outcome(State.FAILURE, exc, is_timeout=True, exception_repr=saferepr(exc),
                   traceback=einfo.traceback)


def refused(runner: Any, task: Any, message: Any, exc: BaseException) -> Outcome:
    """The job could not be handed to a child (its message does not pickle)."""
    logger.critical("Task %s[%s] INTERNAL ERROR: %r", message.name, message.id, exc,
                    exc_info=(type(exc), exc, exc.__traceback__))
    context = context_for(runner, message)
    _, store_errors = _store_errors(task, context)
    try:
        runner.store(task).mark_as_failure(message.id, exc, None, context,
                                           store_result=store_errors, call_errbacks=True)
    except Exception:
        logger.exception("Could not store the failure of %s", message.id)
    return Outcome(State.INTERNAL_ERROR, exc, exception_repr=saferepr(exc))
