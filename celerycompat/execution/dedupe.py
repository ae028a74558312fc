"""``worker_deduplicate_successful_tasks``: a redelivered task that succeeded is not run again.

Celery's rule (``celery.app.trace.build_tracer``): for a task that acks late
(``acks_late`` or ``task_acks_late``), with the setting on and a persistent
result backend, a message the broker marks ``redelivered`` is checked before
it runs. Its id among the ids this process saw succeed: done, silently. Its
stored state SUCCESS: logged as ignored, the link callbacks and the next
chain step published if the stored meta shows no children (the first run
died before publishing them), and done. Either way the consumer acks it and
sends ``task-succeeded`` with no result and no runtime, as Celery does; a
failure to publish those callbacks requeues the message.

Any other stored state, or a backend that cannot be read, runs the task.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from celery.exceptions import BackendGetMetaError, Reject
from celery.result import AsyncResult
from celery.utils.collections import LimitedSet

from celerycompat.execution.outcome import Outcome, State

logger = logging.getLogger("celery.app.trace")

LOG_IGNORED = "Task %(name)s[%(id)s] %(description)s"

#: Publishes the callbacks and chain of the message for a return value, as
#: the first run would have.
Dispatch = Callable[[Any], None]


class Deduplicator:
    """One per runner (so per pool process, as Celery's ``successful_requests``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.enabled = bool(app.conf.get("worker_deduplicate_successful_tasks"))
        self.successful = LimitedSet(
            maxlen=int(os.environ.get("CELERY_WORKER_SUCCESSFUL_MAX", 1000)),
            expires=float(os.environ.get("CELERY_WORKER_SUCCESSFUL_EXPIRES", 10800)))
        self._applies: dict[str, bool] = {}

    def applies(self, task: Any) -> bool:
        """Celery's condition, per task type (fixed once the worker runs)."""
        if not self.enabled:
            return False
        applies = self._applies.get(task.name)
        if applies is None:
            conf = self.app.conf
            applies = self._applies[task.name] = bool(
                (conf.task_acks_late or task.acks_late) and self.app.backend.persistent)
        return applies

    def remember(self, task: Any, task_id: str) -> None:
        """``task_id`` succeeded here."""
        if self.applies(task):
            self.successful.add(task_id)

    def check(self, task: Any, context: Any, name: str, dispatch: Dispatch) -> Outcome | None:
        """The outcome of a duplicate that must not run, or None to run it."""
        if not self.applies(task):
            return None
        delivery_info = context.delivery_info or {}
        if not delivery_info.get("redelivered"):
            return None
        task_id = context.id
        if task_id in self.successful:
            return _done()
        result = AsyncResult(task_id, app=self.app)
        try:
            state = result.state
        except BackendGetMetaError:
            return None
        if state != "SUCCESS":
            return None
        logger.info(LOG_IGNORED, {"id": task_id, "name": name,
                                  "description": "Task already completed successfully."})
        try:
            meta = result._get_task_meta()
            if (context.callbacks or context.chain) and not meta.get("children"):
                dispatch(meta.get("result"))
            self.successful.add(task_id)
        except MemoryError:
            raise
        except Exception as exc:
            logger.error("Failed to dispatch chain/callbacks for deduplicated task %s",
                         task_id, exc_info=True)
            return Outcome(State.REJECTED, Reject(exc, requeue=True), requeue=True)
        return _done()


def _done() -> Outcome:
    """What Celery's pool reports for a skipped duplicate: success, nothing more."""
    return Outcome(State.SUCCESS, None, None, result_repr=None)
