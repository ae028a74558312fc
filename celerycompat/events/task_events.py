"""Which task event a worker sends at which moment, with which fields (E7-E14).

The consumer calls these at the moments Celery's worker sends them:
received (after the message is accepted and not revoked), started (when a
pool slot takes it, after an early ack), and one outcome event when the task
is over, after the message is settled (B7: ``task-rejected`` only when a
reject really happened).
"""

from __future__ import annotations

from typing import Any

from celerycompat.celery_release import reject_fails_task
from celerycompat.events.dispatcher import EventDispatcher
from celerycompat.execution.outcome import Outcome, Settle, State

#: Whether Reject(requeue=False) is announced as task-failed (Celery >= 5.7).
REJECT_FAILS = reject_fails_task()


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


class TaskEvents:
    def __init__(self, dispatcher: EventDispatcher) -> None:
        self.dispatcher = dispatcher

    def _on(self, request: Any) -> bool:
        """A task with ``send_events=False`` sends none (E18)."""
        return bool(getattr(request.task, "send_events", True)) and self.dispatcher.wants("task")

    def received(self, request: Any) -> None:
        if not self._on(request):
            return
        message = request.message
        self.dispatcher.send(
            "task-received", uuid=message.id, name=message.name, args=message.argsrepr,
            kwargs=message.kwargsrepr, root_id=message.root_id, parent_id=message.parent_id,
            retries=message.request.get("retries", 0), eta=_iso(message.eta),
            expires=_iso(message.expires),
        )

    def started(self, request: Any) -> None:
        if self._on(request):
            self.dispatcher.send("task-started", uuid=request.message.id)

    def finished(self, request: Any, outcome: Outcome, settled: Settle) -> None:
        if not self._on(request):
            return
        send, task_id = self.dispatcher.send, request.message.id
        state = outcome.state
        if state is State.SUCCESS:
            send("task-succeeded", uuid=task_id, result=outcome.result_repr,
                 runtime=outcome.runtime)
        elif state in (State.FAILURE, State.INTERNAL_ERROR):
            if settled is not Settle.REQUEUE:  # a requeued lost task is not a failure yet
                send("task-failed", uuid=task_id, exception=outcome.exception_repr,
                     traceback=outcome.traceback)
        elif state is State.RETRY:
            send("task-retried", uuid=task_id, exception=outcome.exception_repr,
                 traceback=outcome.traceback)
        elif state is State.REJECTED and not outcome.requeue and REJECT_FAILS:
            send("task-failed", uuid=task_id, exception=outcome.exception_repr,
                 traceback=outcome.traceback)
        if settled in (Settle.DROP, Settle.REQUEUE):
            send("task-rejected", uuid=task_id, requeue=settled is Settle.REQUEUE)

    def revoked(self, request: Any, *, terminated: bool = False, signum: int | None = None,
                expired: bool = False) -> None:
        if self._on(request):
            self.dispatcher.send("task-revoked", uuid=request.message.id,
                                 terminated=terminated, signum=signum, expired=expired)

    def cancelled(self, request: Any) -> None:
        """Celery's ``Request._announce_cancelled``: the event has only the id."""
        if self._on(request):
            self.dispatcher.send("task-cancelled", uuid=request.message.id)

    def unknown(self, task_id: Any, name: str) -> None:
        """A25: only ``uuid`` and ``exception``."""
        if self.dispatcher.wants("task"):
            self.dispatcher.send("task-failed", uuid=task_id,
                                 exception=f"NotRegistered({name!r})")
