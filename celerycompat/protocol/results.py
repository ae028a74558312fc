"""The result meta document, exactly as Celery 5.7's backends build it (C1-C8).

Pure: given the state, the value and the request, return the dict a Celery
backend would serialize. No clock, no settings lookup, no I/O: the caller
passes ``now`` (the release's clock, ``celery_release.result_clock``) and
the few settings that shape the document. Keeping it pure lets the unit
tests compare every field and every byte with Celery's own
``_get_result_meta`` offline.

Facts mirrored (celery/backends/base.py, 5.7):

* key order ``status, result, traceback, children, date_done``, then
  ``group_id``/``parent_id`` when truthy on the request, then the
  ``result_extended`` fields, then ``task_id`` (added by the KV and RPC
  backends). Dict insertion order *is* the wire order for every serializer.
* ``date_done`` only for READY states.
* exceptions (EXCEPTION states only) become ``{exc_type, exc_message,
  exc_module}`` unless the serializer is pickle, which stores the
  (pickle-safe) exception object itself.
* a returned ``AsyncResult``/``GroupResult`` is stored as its tuple unless
  the serializer is pickle.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Callable

from celery import states
from celery.result import ResultBase
from celery.utils.serialization import get_pickleable_exception
from kombu.utils.encoding import safe_repr

__all__ = (
    "EXCEPTION_ABLE_SERIALIZERS",
    "prepare_exception",
    "prepare_value",
    "encode_result",
    "request_children",
    "result_meta",
)

#: Serializers that can carry an exception object as such (Celery's
#: ``EXCEPTION_ABLE_CODECS``).
EXCEPTION_ABLE_SERIALIZERS = frozenset({"pickle"})

_NO_CHILDREN = object()


def _serializable_args(args: Any, encode: Callable[[Any], Any]) -> tuple:
    # Celery keeps each exception argument the serializer accepts and stores
    # a safe repr of the others, so one odd argument never loses the error.
    kept = []
    for arg in args:
        try:
            encode(arg)
        except Exception:
            kept.append(safe_repr(arg))
        else:
            kept.append(arg)
    return tuple(kept)


def prepare_exception(exc: BaseException, serializer: str, encode: Callable[[Any], Any]) -> Any:
    """Exception -> what Celery stores for it (C6).

    ``encode`` is the result encoder (used only to test each argument).
    With pickle the exception object is returned, swapped by Celery's own
    ``get_pickleable_exception`` for a pickleable stand-in when needed.
    """
    if serializer in EXCEPTION_ABLE_SERIALIZERS:
        return get_pickleable_exception(exc)
    exc_type = type(exc)
    return {
        "exc_type": getattr(exc_type, "__qualname__", exc_type.__name__),
        "exc_message": _serializable_args(exc.args, encode),
        "exc_module": exc_type.__module__,
    }


def prepare_value(result: Any, serializer: str) -> Any:
    """A returned result object is stored as its tuple unless pickling (C5)."""
    if serializer != "pickle" and isinstance(result, ResultBase):
        return result.as_tuple()
    return result


def encode_result(result: Any, state: str, serializer: str, encode: Callable[[Any], Any]) -> Any:
    """The ``result`` field for ``state``: exceptions only in EXCEPTION states."""
    if state in states.EXCEPTION_STATES and isinstance(result, BaseException):
        return prepare_exception(result, serializer, encode)
    return prepare_value(result, serializer)


def request_children(request: Any) -> list | None:
    """``children`` from a request: result tuples, ``None`` without a request (C3).

    Celery falls back to the *current task's* request when none is given;
    that lookup touches thread state, so the caller does it and passes the
    request it found (or ``None``).
    """
    if request:
        return [child.as_tuple() for child in getattr(request, "children", [])]
    return None


def _extended_fields(request: Any, which_stamps: str) -> dict:
    delivery_info = getattr(request, "delivery_info", None)
    fields = {
        "name": getattr(request, "task", None),
        "args": getattr(request, "args", None),
        "kwargs": getattr(request, "kwargs", None),
        "worker": getattr(request, "hostname", None),
        "retries": getattr(request, "retries", None),
        "queue": delivery_info.get("routing_key") if delivery_info else None,
    }
    stamps = getattr(request, "stamps", None) if which_stamps != "none" else None
    if stamps:
        stamped_headers = request.stamped_headers
        fields["stamped_headers"] = stamped_headers
        # Each stamp as a top-level key: all of them ("all", Celery 5.3-5.6),
        # or only those named in stamped_headers ("named", 5.7).
        wanted = stamped_headers or ()
        for name, value in stamps.items():
            if which_stamps == "all" or name in wanted:
                fields[name] = value
    return fields


def result_meta(
    result: Any,
    state: str,
    traceback: str | None,
    request: Any,
    *,
    now: Callable[[], datetime],
    extended: bool,
    children: Any = _NO_CHILDREN,
    task_id: str | None = None,
    stamps: str = "named",
) -> dict:
    """Build the meta dict for one store (``result`` already encoded).

    ``children`` defaults to :func:`request_children` of ``request``; pass it
    explicitly when the request was found by the current-task fallback.
    ``task_id`` (KV and RPC backends) is appended last when given.
    ``stamps`` says which canvas stamps an extended meta copies: ``"named"``
    (those in ``stamped_headers``), ``"all"`` or ``"none"``; ``now`` gives
    ``date_done`` (naive or aware): both differ by Celery release.
    """
    if state in states.READY_STATES:
        date_done = now().isoformat()
    else:
        date_done = None
    meta = {
        "status": state,
        "result": result,
        "traceback": traceback,
        "children": request_children(request) if children is _NO_CHILDREN else children,
        "date_done": date_done,
    }
    if request and getattr(request, "group", None):
        meta["group_id"] = request.group
    if request and getattr(request, "parent_id", None):
        meta["parent_id"] = request.parent_id
    if extended and request:
        meta.update(_extended_fields(request, stamps))
    if task_id is not None:
        meta["task_id"] = task_id
    return meta
