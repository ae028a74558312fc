"""Which queues the worker consumes (wire contract G3).

The app's own ``app.amqp.queues`` already knows ``task_queues``,
``task_default_queue``, ``task_create_missing_queues`` and the queue
arguments (priorities, quorum): selecting from it, as ``celery worker`` does
for ``-Q``/``-X``, declares byte-identical queues and bindings.
"""

from __future__ import annotations

from typing import Any, Sequence

from celery.exceptions import ImproperlyConfigured
from celery.utils.nodenames import worker_direct


def select_queues(app: Any, include: Sequence[str] | None, exclude: Sequence[str] | None,
                  nodename: str) -> list[Any]:
    """Apply ``-Q``/``-X`` (and ``worker_direct``) and return the kombu queues."""
    queues = app.amqp.queues
    _apply(queues.select, "select", include)
    _apply(queues.deselect, "deselect", exclude)
    if app.conf.worker_direct:
        queues.select_add(worker_direct(nodename))
    return list(queues.consume_from.values())


def _apply(change: Any, verb: str, names: Sequence[str] | None) -> None:
    """``select``/``deselect`` with Celery's error for a queue ``task_queues`` lacks."""
    wanted = list(names or ())
    try:
        change(wanted)
    except KeyError as exc:
        raise ImproperlyConfigured(
            f"Trying to {verb} queue subset of {wanted!r}, "
            f"but queue {exc} isn't defined in the `task_queues` setting."
        ) from None
