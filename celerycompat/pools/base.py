"""The one interface every pool offers the consumer.

A pool runs tasks in slots. The consumer decides *when* a task may start
(it counts free slots, so prefetched messages wait in the consumer, unacked,
as Celery's do); the pool decides *where* it runs: inline (solo), in a
thread, and later in a child process or a greenlet.

What crosses the boundary is plain data: the task name and the parsed
`TaskMessage` going in, an `Outcome` coming back through ``on_done``. That
is what lets a pool run tasks in another process, where the runner is the
child's own.
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol

from celerycompat.execution.outcome import Outcome, State
from celerycompat.execution.runner import TaskRunner
from celerycompat.protocol.message import TaskMessage

OnDone = Callable[[Outcome], None]

logger = logging.getLogger("celery.worker.request")


class Pool(Protocol):
    name: str
    """The implementation name as ``inspect stats`` reports it."""
    limit: int
    """How many tasks may run at once."""
    runs_inline: bool
    """True when ``apply`` runs the task before returning (solo)."""

    def start(self) -> None: ...

    def apply(self, task_name: str, message: TaskMessage, on_done: OnDone) -> None:
        """Run the task in a free slot; call ``on_done`` once, whatever happens.

        The caller guarantees a slot is free. ``on_done`` may be called from
        another thread.
        """

    def info(self) -> dict:
        """The ``pool`` section of ``inspect stats`` (F10), in Celery's shape."""

    def pid_for(self, task_id: str) -> int | None:
        """The pid of the process running ``task_id`` (``worker_pid``, B38)."""

    def stop(self, wait: bool = True) -> None:
        """Stop taking tasks; with ``wait`` return only when running ones are done."""


def run_guarded(runner: TaskRunner, task_name: str, message: TaskMessage,
                on_done: OnDone) -> None:
    """Run one task in this process and always report an outcome.

    Whatever happens (a result backend that is down, a bug of ours), the
    slot must be given back and the message settled, or the worker silently
    loses a slot for good. Only ``KeyboardInterrupt``/``SystemExit`` go on
    up, after reporting.
    """
    outcome = Outcome(State.INTERNAL_ERROR)
    try:
        outcome = runner.run(runner.app.tasks[task_name], message)
    except BaseException as exc:
        outcome = Outcome(State.INTERNAL_ERROR, exc, exception_repr=repr(exc))
        logger.critical("Task %s[%s] INTERNAL ERROR: %r", message.name, message.id, exc,
                        exc_info=True)
        if not isinstance(exc, Exception):
            raise
    finally:
        on_done(outcome)
