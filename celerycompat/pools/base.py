"""The one interface every pool offers the consumer.

A pool runs tasks in slots. The consumer decides *when* a task may start
(it counts free slots, so prefetched messages wait in the consumer, unacked,
as Celery's do); the pool decides *where* it runs: inline (solo), in a
thread, a child process (prefork) or a greenlet (gevent).

What crosses the boundary is plain data: the task name and the parsed
`TaskMessage` going in, an `Outcome` coming back through ``on_done``. That
is what lets a pool run tasks in another process, where the runner is the
child's own.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Protocol

from celerycompat.execution.outcome import Outcome, State
from celerycompat.execution.runner import TaskRunner
from celerycompat.protocol.message import TaskMessage

OnDone = Callable[[Outcome], None]

logger = logging.getLogger("celery.worker.request")


class Pool(Protocol):
    name: str
    """The implementation name as ``inspect stats`` reports it."""
    limit: int
    """How many tasks may run at once (the consumer's slot count)."""
    runs_inline: bool
    """True when ``apply`` runs the task before returning (solo)."""
    task_join_will_block: bool
    """Celery's pool attribute of that name: True where a task waiting on
    another task's result could block the pool (every pool but gevent's).
    The worker sets Celery's process-wide flag from it, which makes
    ``result.get()`` inside a task an error and keeps a task's
    ``.delay()`` from subscribing to the result channel."""

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

    def terminate(self, task_id: str, signum: int) -> bool:
        """End the run of ``task_id`` now (``revoke(terminate=True)``).

        Called on the consumer thread for a task the consumer handed to
        ``apply`` and has no outcome for yet. True if the run is being ended:
        the pool then still calls its ``on_done`` once, when the run is gone
        (prefork: the child running it was sent ``signum`` and exited, or
        finished anyway; ``State.REVOKED`` if the pool ended it itself). The
        consumer has announced REVOKED by then and drops that outcome. False
        if the pool cannot end it (solo; a run already writing its result).
        """

    def restart(self) -> None:
        """``pool_restart``: replace the pool's processes with fresh ones
        (forked from the reloaded parent); NotImplementedError for pools
        that run tasks in this process, as Celery's do."""

    queue_ahead: int
    """How many tasks the pool takes beyond ``limit``, to start the moment a
    slot frees without waiting for the consumer (prefork: a child's next
    job is sent as it reports the last one, as Celery hands every prefetched
    task to its pool at once). The consumer counts such a task as started
    only when a slot frees for it (`Consumer._promote_waiting`)."""

    def withdraw(self, messages: list[TaskMessage]) -> list[TaskMessage]:
        """Take back those of ``messages`` (handed to ``apply`` ahead of a free
        slot) that no slot has taken yet; their ``on_done`` is never called.
        Called on the consumer thread (warm shutdown, a revoke)."""


class SlotsOnly:
    """For pools that take no task beyond their slots (``queue_ahead`` 0)."""

    queue_ahead = 0

    def withdraw(self, messages: list[TaskMessage]) -> list[TaskMessage]:
        return []


class ResizablePool(Pool, Protocol):
    """A pool whose number of slots changes at run time (``pool_grow``,
    ``pool_shrink``, ``--autoscale``). ``limit`` follows; the consumer's
    slot count and prefetch count follow ``limit``. The solo pool is not
    one (Celery's has no ``grow`` either)."""

    def grow(self, n: int = 1) -> None:
        """``n`` more slots."""

    def shrink(self, n: int = 1) -> None:
        """``n`` fewer slots; ValueError if the pool cannot give up that many
        now (prefork: only idle processes stop, as billiard's)."""


#: Called with ``(message, soft)`` when a task's soft limit fires, after the
#: warning: the worker's `consumer.project_requests` registers here, to call
#: a task's own ``Request.on_timeout(True, soft)`` as Celery's prefork pool does.
soft_limit_listeners: list[Callable[[TaskMessage, Any], None]] = []


def soft_limit_exceeded(soft: Any, message: TaskMessage) -> None:
    """Celery's soft-limit warning for ``message``, then the listeners.

    Every pool calls it at the moment the soft limit fires (its timer's
    thread or greenlet; solo: its signal handler).
    """
    logger.warning("Soft time limit (%ss) exceeded for %s[%s]", soft, message.name, message.id)
    for listener in tuple(soft_limit_listeners):
        listener(message, soft)


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
