"""``task.request`` as Celery builds it inside a worker (wire contract B31).

User code reads these names (``self.request.id``, ``.retries``,
``.delivery_info``, ``.reply_to``, ``.chain``...), and Celery's own
``Task.retry``/``replace``/``update_state`` depend on them, so the object is a
real ``celery.app.task.Context`` filled exactly as a stock worker fills it.
"""

from __future__ import annotations

from typing import Any

from celery.app.task import Context

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
