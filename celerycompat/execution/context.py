"""``task.request`` as Celery builds it inside a worker (wire contract B31).

User code reads these names (``self.request.id``, ``.retries``,
``.delivery_info``, ``.reply_to``, ``.chain``...), and Celery's own
``Task.retry``/``replace``/``update_state`` depend on them, so the object is a
real ``celery.app.task.Context`` filled exactly as a stock worker fills it.
"""

from __future__ import annotations

from typing import Any

from celery.app.task import Context
from celery.utils.imports import symbol_by_name
from celery.worker.request import Request as CeleryRequest

from celerycompat.protocol.message import TaskMessage


def request_dict(message: TaskMessage, *, hostname: str, loglevel: int | None,
                 logfile: str | None) -> dict[str, Any]:
    """The dict a stock worker hands its tracer: headers, properties, then the embed."""
    request = dict(message.request)
    request["hostname"] = hostname
    request["loglevel"] = loglevel
    request["logfile"] = logfile
    request["is_eager"] = False
    request.update(message.embed)
    return request


def build_context(message: TaskMessage, request: dict[str, Any]) -> Context:
    """``Context(request, args=..., called_directly=False, kwargs=...)`` as the tracer does."""
    return Context(request, args=message.args, called_directly=False,
                   kwargs=message.kwargs)


def own_request_class(task: Any) -> type | None:
    """The task's own ``Request`` class (``Task.Request``), or None when it is Celery's.

    Its hooks run in the worker (consumer/project_requests.py); a prefork
    child then sends a failed run's exception to the parent for them.
    """
    cls = task.Request
    if isinstance(cls, str):
        cls = symbol_by_name(cls)
    return None if cls is CeleryRequest else cls
