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
    try:
        queues.select(list(include or ()))
    except KeyError as exc:
        raise ImproperlyConfigured(
            f"Trying to select queue subset of {list(include or ())!r}, "
            f"but queue {exc} isn't defined in the `task_queues` setting."
        ) from None
    try:
        queues.deselect(list(exclude or ()))
    except KeyError as exc:
        raise ImproperlyConfigured(
            f"Trying to deselect queue subset of {list(exclude or ())!r}, "
            f"but queue {exc} isn't defined in the `task_queues` setting."
        ) from None
    if app.conf.worker_direct:
        queues.select_add(worker_direct(nodename))
    return list(queues.consume_from.values())
