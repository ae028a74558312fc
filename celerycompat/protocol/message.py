"""Task messages as they arrive: protocol v2, v1 and the v1/v2 hybrid.

Pure: no sockets, no threads, no app. The consumer hands in what the
transport delivered (headers, properties, delivery info, the serialized
body) plus a ``decode`` function that enforces ``accept_content``; out comes
a `TaskMessage` or one of the exceptions below, each of which maps to one of
Celery's outcomes for a message it cannot run (wire contract A24-A27).

Two steps, because Celery looks at the task name before it decodes a v2
body: an unknown task is failed with ``NotRegistered`` even when its body
would not decode. `peek` finds the name (decoding only v1 bodies, where the
name lives in the body); `parse` decodes and validates the rest.

Hostile input: whatever the headers and body hold, `peek` and `parse` raise
only the exceptions below (tests/unit/test_fuzz_protocol.py drives them with
generated junk), and a `TaskMessage` they return has fields of the types the
rest of the worker relies on. Where Celery 5.7 itself crashes on a malformed
field (a ``timelimit`` that is not a pair, an id that is not a string, a body
that is not a list) the message is rejected as invalid instead (A24).
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from typing import Any, Callable, Mapping

from dateutil.parser import isoparse

#: ``decode(body, content_type, content_encoding) -> payload``; raises
#: `ContentRefused`, `BodyUndecodable` or `BodyTooLarge`.
Decoder = Callable[[bytes, "str | None", "str | None"], Any]


class UnknownMessage(Exception):
    """Not a task message at all: Celery logs "Received and deleted unknown message" (A26)."""


class InvalidTaskMessage(Exception):
    """A task message Celery would reject as invalid (A24): reject, no requeue, no result."""


class ContentRefused(InvalidTaskMessage):
    """The content type is not in ``accept_content`` (handled as invalid, A24/A29)."""


class BodyUndecodable(Exception):
    """The body cannot be deserialized: Celery logs it as critical and acks (A27)."""


class BodyTooLarge(InvalidTaskMessage):
    """The body is over the worker's size limit (`limit_body_size`).

    Raised before a byte of it is decoded, so a huge message costs the
    worker the bytes it already holds and no more; handled as an invalid
    message (rejected, not requeued, ``task_rejected`` sent).
    """


def limit_body_size(decode: Decoder, max_bytes: int | None) -> Decoder:
    """``decode`` that first refuses bodies longer than ``max_bytes`` (None/0: no limit).

    The limit is on the serialized body as the transport delivered it
    (after kombu undid the Redis base64 and any ``compression``): what the
    decoder would turn into Python objects, typically several times its size.
    """
    if not max_bytes:
        return decode

    def limited(body: bytes, content_type: str | None, content_encoding: str | None) -> Any:
        size = len(body) if body is not None else 0
        if size > max_bytes:
            raise BodyTooLarge(
                f"message body is {size:,} bytes, over the limit of {max_bytes:,} bytes "
                f"(CCWORKER_MAX_MESSAGE_BYTES)")
        return decode(body, content_type, content_encoding)

    return limited


_EMPTY_EMBED: Mapping[str, Any] = {
    "callbacks": None,
    "errbacks": None,
    "chain": None,
    "chord": None,
}


@dataclass
class Peeked:
    """What is known about a message before its body is trusted."""

    task: str
    id: Any
    root_id: Any
    protocol: int
    v1_body: dict[str, Any] | None = None


@dataclass
class TaskMessage:
    """A decoded, validated task message, in protocol-v2 terms whatever came in.

    ``request`` is the dict Celery turns into ``task.request`` (headers, then
    properties, reply_to, correlation_id, delivery_info, args, kwargs); the
    worker adds ``hostname`` and the embed before the task runs.
    """

    task: str
    id: str
    name: str
    args: list[Any] | tuple[Any, ...]
    kwargs: dict[str, Any]
    embed: Mapping[str, Any]
    request: dict[str, Any]
    delivery_info: dict[str, Any]
    eta: datetime | None = None
    expires: datetime | None = None
    utc: bool = True
    argsrepr: str = ""
    kwargsrepr: str = ""
    root_id: Any = None
    parent_id: Any = None
    retries: int = 0
    timelimit: Any = None
    ignore_result: bool | None = None
    stamped_headers: list[str] = field(default_factory=list)
    """Names of the canvas stamps the message carries (Celery 5.3+ stamping)."""
    stamps: dict[str, Any] = field(default_factory=dict)
    """Each stamped header's value (or list of values); None when ``stamps`` lacks it."""
    extra: dict[str, Any] = field(default_factory=dict)
    ack_ticket: Any = None
    """Not from the wire: set by the consumer when the message's ack may ride
    with the task's result write (backends/riding_acks.py)."""


def peek(headers: Any, body: bytes, content_type: str | None,
         content_encoding: str | None, decode: Decoder) -> Peeked:
    """Find the task name and id (A13, A26).

    v2 carries them in the headers; a message whose headers have no ``task``
    is v1 and carries them in the body, which must then be decoded now.
    """
    if not isinstance(headers, dict):
        raise UnknownMessage("message headers are not a mapping")
    if "task" in headers:
        return Peeked(
            task=_task_name(headers["task"]),
            id=headers.get("id"),
            root_id=headers.get("root_id"),
            protocol=2,
        )
    payload = decode(body, content_type, content_encoding)
    if not isinstance(payload, dict) or "task" not in payload:
        raise UnknownMessage("message has no task name")
    return Peeked(
        task=_task_name(payload["task"]),
        id=payload.get("id"),
        root_id=None,
        protocol=1,
        v1_body=payload,
    )


def _task_name(name: Any, what: str = "task name") -> Any:
    """A name the task registry is looked up with, or tasks are counted by.

    Any hashable value is used as is, as Celery does (``42`` or ``None`` is
    an unknown task: ``NotRegistered``; a numeric ``shadow`` names the
    task in log lines); a list or mapping, on which Celery's worker
    crashes, makes the message invalid.
    """
    try:
        hash(name)
    except TypeError:
        raise InvalidTaskMessage(f"{what} is not a string: {name!r:.200}") from None
    return name


def parse(peeked: Peeked, headers: dict[str, Any], properties: Mapping[str, Any],
          delivery_info: Mapping[str, Any], body: bytes, content_type: str | None,
          content_encoding: str | None, decode: Decoder, *,
          worker_utc: bool, worker_tz: tzinfo | None,
          saferepr: Callable[[Any], str] = repr,
          redelivered_default: bool | None = False) -> TaskMessage:
    """Decode and validate a message whose task is known to the worker.

    ``worker_utc``/``worker_tz`` are the worker app's timezone settings: for
    v2 messages Celery takes "is the ETA UTC" from the worker, not the
    message (A15). ``redelivered_default`` is ``delivery_info['redelivered']``
    where the transport leaves it out (kombu's Redis does): False since
    Celery 5.3, None before.
    """
    if peeked.protocol == 2:
        payload = decode(body, content_type, content_encoding)
        if isinstance(payload, dict) and "args" in payload:
            args, kwargs, embed, req, utc = _from_hybrid(payload, headers)
        else:
            args, kwargs, embed = _split_v2_body(payload)
            req, utc = dict(headers), worker_utc
    elif "args" in peeked.v1_body:
        # Celery 5.7 checks for ``args`` in the body first, so a v1 body
        # that has them is read as a hybrid: header keys absent from the
        # body become None (``lang``, ``meth``...) and ``utc`` stays out
        # of the request.
        args, kwargs, embed, req, utc = _from_hybrid(peeked.v1_body, headers)
    else:
        args, kwargs, embed, req, utc = _from_v1(peeked.v1_body, headers, saferepr)

    task_id = req.get("id")
    if task_id is None or task_id == "":
        raise InvalidTaskMessage("task message has no id")
    if not isinstance(task_id, str):
        # Celery 5.7 crashes on these (a list is unhashable, a number
        # cannot be a result key): refused, never half-run.
        raise InvalidTaskMessage(f"task id is not a string: {task_id!r:.200}")
    task_name = _task_name(req.get("task") or peeked.task)
    name = _task_name(req.get("shadow") or task_name, "shadow name")

    eta = _parse_time(req.get("eta"), "ETA", worker_tz)
    expires = _parse_time(req.get("expires"), "expires", worker_tz)
    info = {
        "exchange": delivery_info.get("exchange"),
        "routing_key": delivery_info.get("routing_key"),
        "priority": properties.get("priority"),
        "redelivered": delivery_info.get("redelivered", redelivered_default),
    }
    req.update(
        properties=dict(properties),
        reply_to=properties.get("reply_to"),
        correlation_id=properties.get("correlation_id"),
        delivery_info=info,
        args=args,
        kwargs=kwargs,
    )
    retries = req.get("retries") or 0
    ignore_result = req.get("ignore_result")
    timelimit = _timelimit(req.get("timelimit"))
    stamped_headers, stamps = _stamps(req)
    return TaskMessage(
        task=task_name,
        id=task_id,
        name=name,
        args=args,
        kwargs=kwargs,
        embed=embed,
        request=req,
        delivery_info=info,
        eta=eta,
        expires=expires,
        utc=utc,
        argsrepr=req.get("argsrepr") or "",
        kwargsrepr=req.get("kwargsrepr") or "",
        root_id=req.get("root_id"),
        parent_id=req.get("parent_id"),
        retries=retries if isinstance(retries, int) and not isinstance(retries, bool) else 0,
        timelimit=timelimit,
        # Celery reads any value but None as the override, by truthiness.
        ignore_result=None if ignore_result is None else bool(ignore_result),
        stamped_headers=stamped_headers,
        stamps=stamps,
    )


#: The longest wait ``threading`` accepts; a longer limit is no limit.
_LONGEST_LIMIT = threading.TIMEOUT_MAX


def _timelimit(value: Any) -> tuple[Any, Any] | None:
    """``timelimit`` (A17) as the pools can use it: ``(hard, soft)`` or None.

    A falsy value is no limit, as in Celery. Anything else must be a pair:
    Celery 5.7 crashes on a string, a number or a longer list
    (``Unrecoverable error``); here the message is invalid. Inside the pair a
    value that is not a usable number of seconds (a string, a bool, NaN,
    infinite, zero or negative, longer than ``threading`` can wait) is
    ignored, i.e. the task's own limit applies: Celery's solo pool, which
    enforces no limits, runs those messages too, and its prefork pool would
    do arithmetic on them.
    """
    if not value:
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InvalidTaskMessage(
            f"invalid timelimit value {value!r:.200}: expected [hard, soft] in seconds")
    return _seconds(value[0]), _seconds(value[1])


def _seconds(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not math.isfinite(value) or value <= 0 or value > _LONGEST_LIMIT:
        return None
    return value


def _stamps(req: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """Canvas stamps: ``stamped_headers`` names them, ``stamps`` holds their values.

    Read as Celery's worker ``Request`` reads them (``stamps`` restricted to
    the names in ``stamped_headers``, None for a name without a value). They
    stay in ``request`` too, unchanged: ``task.request.stamps`` is Celery's.
    Malformed fields (not a list, not a mapping, a name that is not a
    string) count as no stamps instead of failing the message later.
    """
    names = req.get("stamped_headers")
    if not names:  # the common case: nothing stamped
        return [], {}
    values = req.get("stamps") or {}
    if not isinstance(names, (list, tuple)):
        return [], {}
    if not isinstance(values, Mapping):
        values = {}
    names = [name for name in names if isinstance(name, str)]
    return names, {name: values.get(name) for name in names}


def _split_v2_body(payload: Any) -> tuple[Any, dict[str, Any], Mapping[str, Any]]:
    """``[args, kwargs, embed]`` (A8), validated where Celery 5.7 would crash."""
    if not isinstance(payload, (list, tuple)) or len(payload) != 3:
        raise InvalidTaskMessage("task body is not a [args, kwargs, embed] list")
    args, kwargs, embed = payload
    if not isinstance(args, (list, tuple)):
        raise InvalidTaskMessage("Task positional arguments must be a list")
    if not isinstance(kwargs, dict):
        raise InvalidTaskMessage("Task keyword arguments is not a mapping")
    if embed is None:
        embed = _EMPTY_EMBED
    elif not isinstance(embed, dict):
        raise InvalidTaskMessage("task embed is not a mapping")
    return args, kwargs, embed


def _v1_args(body: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    args, kwargs = body.get("args", ()), body.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise InvalidTaskMessage("Task keyword arguments must be a mapping")
    if not isinstance(args, (list, tuple)):
        raise InvalidTaskMessage("Task positional arguments must be a list")
    return args, kwargs


def _v1_embed(body: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "callbacks": body.get("callbacks"),
        "errbacks": body.get("errbacks"),
        "chord": body.get("chord"),
        "chain": None,
    }


def _from_hybrid(body: dict[str, Any], headers: dict[str, Any]):
    """A v2 header set with a v1-style dict body: headers win (A14)."""
    args, kwargs = _v1_args(body)
    req = {
        key: body.get(key)
        for key in ("lang", "task", "id", "root_id", "parent_id", "group", "meth",
                    "shadow", "eta", "expires", "argsrepr", "kwargsrepr", "origin")
    }
    req["retries"] = body.get("retries", 0)
    req["timelimit"] = body.get("timelimit", (None, None))
    req.update(headers)
    return args, kwargs, _v1_embed(body), req, body.get("utc", True)


def _from_v1(body: dict[str, Any], headers: Mapping[str, Any],
             saferepr: Callable[[Any], str]):
    """Protocol v1: everything is in the body (A13)."""
    args, kwargs = _v1_args(body)
    req = dict(body)
    req.update(argsrepr=saferepr(args), kwargsrepr=saferepr(kwargs), headers=headers)
    if "taskset" in req:
        req["group"] = req["taskset"]
    return args, kwargs, _v1_embed(body), req, body.get("utc", True)


def _parse_time(value: Any, what: str, worker_tz: tzinfo | None) -> datetime | None:
    """ISO-8601 eta/expires (A16); naive values are UTC, then shown in the worker tz."""
    if not value:
        return None
    if isinstance(value, datetime):
        parsed = value
    else:
        try:
            parsed = parse_iso8601(value)
        except Exception as exc:  # noqa: BLE001 - any junk is an invalid message
            # Celery's words, the value in full as Celery shows it.
            raise InvalidTaskMessage(f"invalid {what} value {value!r}: {exc}") from None
    try:
        if parsed.tzinfo is None or parsed.tzinfo.utcoffset(parsed) is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
            if worker_tz is not None:
                parsed = parsed.astimezone(worker_tz)
        parsed.timestamp()  # the consumer compares timestamps: must be representable
    except (OverflowError, ValueError) as exc:
        raise InvalidTaskMessage(f"invalid {what} value {value!r}: {exc}") from None
    return parsed


#: What ``datetime.isoformat()`` writes (Celery clients): read by the C parser,
#: which gives the same instant as dateutil's for exactly these strings.
_PLAIN_ISOFORMAT = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{6})?(?:[+-]\d{2}:\d{2})?", re.ASCII).fullmatch


def parse_iso8601(text: Any) -> datetime:
    """Parse an ETA/expiry string as Celery's worker does (``dateutil.parser.isoparse``).

    The same parser, so the same strings are accepted and a bad one is
    refused with the same words in the log line; the common shape producers
    send takes the C parser (50x faster, same result).
    """
    if isinstance(text, str) and _PLAIN_ISOFORMAT(text):
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            pass  # e.g. month 13: dateutil words the error
    return isoparse(text)
