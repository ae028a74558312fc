"""celerycompat.protocol.results (and the stores' MetaEncoder) against Celery.

The oracle is a Celery app whose backend is Redis *by URL only*: building
the meta and encoding it never touches the network, so Celery's own
``_get_result_meta`` + ``encode`` can be compared with ours byte for byte,
offline, for every (serializer, state, value, request, settings)
combination below.
"""

from __future__ import annotations

import itertools
import pickle
from datetime import datetime, timezone

import pytest
from celery import Celery, states
from celery.app.task import Context
from celery.exceptions import Retry, TaskRevokedError, TimeLimitExceeded
from celery.result import AsyncResult, GroupResult

from celerycompat.backends.base import MetaEncoder
from celerycompat.backends.redis import RedisResultStore
from celerycompat.protocol import codecs, results

FIXED_UTC = datetime(2026, 11, 21, 13, 51, 50, 338050, tzinfo=timezone.utc)


class Outer:
    class NestedError(Exception):
        """Exception with a dotted qualname."""


class CustomError(Exception):
    def __init__(self, code, detail=None):
        super().__init__(code, detail)


class Unpicklable:
    def __reduce__(self):
        raise TypeError("no pickling")

    def __repr__(self):
        return "<Unpicklable>"


def make_app(serializer="json", extended=False, tz="UTC", compression=None):
    app = Celery("oracle", backend="redis://127.0.0.1:6379/9", broker="memory://",
                 set_as_current=False)
    app.conf.update(
        result_serializer=serializer,
        accept_content=["json", "msgpack", "yaml", "pickle"],
        result_accept_content=["json", "msgpack", "yaml", "pickle"],
        result_extended=extended,
        timezone=tz,
    )
    if compression:
        app.conf.result_compression = compression
    fixed = FIXED_UTC.astimezone(app.timezone)
    app.now = lambda: fixed  # both Celery's and our builder read app.now
    return app


def make_request(app, kind):
    if kind == "none":
        return None
    req = Context(
        id="tid-1", task="proj.tasks.add", args=[1, 2], kwargs={"x": "é"},
        hostname="celery@host", retries=2, delivery_info={"routing_key": "celery"},
        reply_to="reply-q", correlation_id="tid-1",
    )
    if kind in ("grouped", "full"):
        req.group = "group-1"
        req.parent_id = "parent-1"
    if kind == "full":
        req.children.append(AsyncResult("child-1", app=app))
        child = AsyncResult("child-2", parent=AsyncResult("child-1", app=app), app=app)
        req.children.append(child)
        req.children.append(GroupResult("g-2", [AsyncResult("m-1", app=app)], app=app))
        req.stamped_headers = ["on_me", "other"]
        req.stamps = {"on_me": "v1", "other": ["a", 1], "not_listed": 3}
    if kind == "no-delivery-info":
        req.delivery_info = None
    return req


VALUES = {
    "int": 5,
    "dict": {"a": [1, 2.5, None, True], "é": "ü"},
    "none": None,
    "progress-meta": {"current": 3, "total": 10},
    "value-error": ValueError("boom", 42),
    "no-args": KeyError(),
    "nested-qualname": Outer.NestedError("n"),
    "custom": CustomError(7, {"k": "v"}),
    "unserializable-arg": ValueError(object(), "ok"),
    "unpicklable-arg": ValueError(Unpicklable()),
    "revoked": TaskRevokedError("expired"),
    "time-limit": TimeLimitExceeded(1.0),
    "retry": Retry("Retry in 1s", ValueError("inner"), 1),
    "async-result": AsyncResult("r-1", parent=AsyncResult("r-0")),
    "group-result": GroupResult("g-1", [AsyncResult("m-1"), AsyncResult("m-2")]),
}
STATES = [states.SUCCESS, states.FAILURE, states.RETRY, states.REVOKED, states.STARTED,
          "PROGRESS"]
REQUESTS = ["none", "plain", "grouped", "full", "no-delivery-info"]
SERIALIZERS = ["json", "msgpack", "yaml", "pickle"]


def celery_meta(app, value, state, request, traceback):
    backend = app.backend
    encoded = backend.encode_result(value, state)
    meta = backend._get_result_meta(result=encoded, state=state, traceback=traceback,
                                    request=request)
    meta["task_id"] = "tid-1"
    return meta


def cases():
    for serializer, state, vname, rkind, extended in itertools.product(
            SERIALIZERS, STATES, VALUES, REQUESTS, (False, True)):
        flavour = "ext" if extended else "std"
        yield pytest.param(serializer, state, vname, rkind, extended,
                           id=f"{serializer}-{state}-{vname}-{rkind}-{flavour}")


def _plain(value):
    """Exceptions (pickle) compare by type and args; bare objects by type."""
    if isinstance(value, BaseException):
        return (type(value), tuple("<self>" if arg is value else _plain(arg)
                                   for arg in value.args))
    if type(value) is object:
        return "object"
    return value


def _comparable(meta):
    return {key: _plain(value) for key, value in meta.items()}


@pytest.mark.parametrize("serializer, state, vname, rkind, extended", list(cases()))
def test_meta_and_bytes_match_celery(serializer, state, vname, rkind, extended):
    app = make_app(serializer, extended)
    value = VALUES[vname]
    request = make_request(app, rkind)
    traceback = "Traceback (most recent call last):\n  ...\nValueError: boom" \
        if state in (states.FAILURE, states.RETRY) else None

    try:
        expected = celery_meta(app, value, state, request, traceback)
        expected_bytes = app.backend.encode(expected)
    except Exception as exc:  # Celery itself can't encode it: neither may we
        encoder = MetaEncoder(app, app.backend)
        with pytest.raises(type(exc)):
            codecs.dumps(encoder.meta("tid-1", encoder.encode_result(value, state), state,
                                      traceback, request), serializer)
        return

    encoder = MetaEncoder(app, app.backend)
    ours = encoder.meta("tid-1", encoder.encode_result(value, state), state, traceback, request)
    assert list(ours) == list(expected)  # field order is wire-visible
    assert _comparable(ours) == _comparable(expected)

    ctype, cenc, payload = codecs.dumps(ours, serializer)
    if isinstance(expected_bytes, str):
        expected_bytes = expected_bytes.encode("utf-8")
    if serializer == "pickle" and isinstance(value, BaseException) \
            and state in states.EXCEPTION_STATES:
        # the exception object is re-made per call; compare what a reader sees
        assert _comparable(pickle.loads(payload)) == _comparable(pickle.loads(expected_bytes))
    else:
        assert payload == expected_bytes
    assert (ctype, cenc) == (app.backend.content_type, app.backend.content_encoding)


@pytest.mark.parametrize("tz", ["UTC", "Europe/Paris", "America/New_York"])
def test_date_done_is_aware_isoformat_in_app_timezone(tz):
    app = make_app(tz=tz)
    meta = results.result_meta(5, states.SUCCESS, None, None, now=app.now, extended=False)
    expected = celery_meta(app, 5, states.SUCCESS, None, None)
    assert meta["date_done"] == expected["date_done"]
    assert datetime.fromisoformat(meta["date_done"]).utcoffset() is not None
    assert results.result_meta(5, states.RETRY, None, None, now=app.now,
                               extended=False)["date_done"] is None


def test_children_fall_back_to_the_current_task_like_celery():
    app = make_app()

    @app.task(bind=True)
    def parent(self):
        return None

    from celery._state import _task_stack

    parent.push_request(id="running")
    parent.request.children.append(AsyncResult("kid", app=app))
    _task_stack.push(parent)  # what the tracer does around a task body
    try:
        encoder = MetaEncoder(app, app.backend)
        ours = encoder.meta("tid-1", None, states.REVOKED, None, None)
        expected = celery_meta(app, None, states.REVOKED, None, None)
    finally:
        _task_stack.pop()
        parent.pop_request()
    assert ours["children"] == expected["children"] == [(("kid", None), None)]


def test_request_children_none_without_request():
    assert results.request_children(None) is None
    assert results.request_children(Context()) == []


def test_exception_document_for_non_pickle():
    doc = results.prepare_exception(ValueError("boom", 42), "json", codecs.json_dumps)
    assert doc == {"exc_type": "ValueError", "exc_message": ("boom", 42),
                   "exc_module": "builtins"}
    doc = results.prepare_exception(Outer.NestedError(object()), "json", codecs.json_dumps)
    assert doc["exc_type"] == "Outer.NestedError"
    assert doc["exc_message"][0].startswith("<object object at")


@pytest.mark.parametrize("compression", ["zlib", "bzip2", "lzma"])
def test_compressed_payload_matches_celery(compression):
    app = make_app(compression=compression)
    store = RedisResultStore(app, app.backend)  # no I/O until a write
    encoder = store.encoder
    ours = encoder.meta("tid-1", encoder.encode_result(5, states.SUCCESS), states.SUCCESS,
                        None, None)
    expected = celery_meta(app, 5, states.SUCCESS, None, None)
    assert store.encode_meta(ours) == app.backend.encode(expected)
