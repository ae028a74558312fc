"""protocol/message.py against real messages a Celery 5.7 client produces.

The oracle is Celery itself: messages are built with the real client's
``app.amqp.as_task_v2``/``as_task_v1`` and the real json codec, then parsed.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from celery import Celery
from hypothesis import given
from hypothesis import strategies as st
from kombu.utils.json import dumps as kombu_dumps

from celerycompat.protocol import codecs
from celerycompat.protocol import message as wire

ACCEPT = codecs.prepare_accept(["json"])


def decode(body, content_type, content_encoding):
    try:
        return codecs.loads(body, content_type, content_encoding, ACCEPT)
    except codecs.ContentDisallowed:
        raise
    except codecs.DecodeError as exc:
        raise wire.BodyUndecodable(exc) from exc


@pytest.fixture(scope="module")
def app():
    return Celery("t", set_as_current=False)


def parse(headers, body, properties=None, delivery_info=None,
          content_type="application/json"):
    raw = body if isinstance(body, bytes) else kombu_dumps(body).encode()
    peeked = wire.peek(headers, raw, content_type, "utf-8", decode)
    return wire.parse(peeked, headers, properties or {}, delivery_info or {}, raw,
                      content_type, "utf-8", decode, worker_utc=True, worker_tz=timezone.utc)


def test_v2_message_from_real_client(app):
    eta = datetime.now(timezone.utc) + timedelta(seconds=30)
    msg = app.amqp.as_task_v2("abc", "proj.add", args=(2, 3), kwargs={"z": 1}, eta=eta,
                              shadow="shown", root_id="root", parent_id="parent")
    props = {"correlation_id": "abc", "reply_to": "oid", "priority": 3}
    info = {"exchange": "", "routing_key": "celery", "redelivered": False}
    out = parse(msg.headers, msg.body, props, info)
    assert (out.task, out.id, out.name) == ("proj.add", "abc", "shown")
    assert out.args == [2, 3] and out.kwargs == {"z": 1}
    assert out.eta == eta
    assert out.root_id == "root" and out.parent_id == "parent"
    assert out.delivery_info == {"exchange": "", "routing_key": "celery", "priority": 3,
                                 "redelivered": False}
    assert out.request["reply_to"] == "oid" and out.request["correlation_id"] == "abc"
    assert out.embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_v1_message_from_real_client(app):
    msg = app.amqp.as_task_v1("abc", "proj.add", args=(2, 3), kwargs={"z": 1})
    out = parse(msg.headers, msg.body)
    assert (out.task, out.id) == ("proj.add", "abc")
    assert out.args == [2, 3] and out.kwargs == {"z": 1}
    # Celery 5.7 reads a v1 body that has ``args`` as a hybrid message:
    # header keys the body lacks are None, and ``utc`` is not in the request.
    assert out.request["lang"] is None and out.request["meth"] is None
    assert "utc" not in out.request


def test_v1_body_without_args_uses_protocol_1_defaults():
    out = parse({}, {"task": "t.x", "id": "1"})
    assert out.args == () and out.kwargs == {}
    assert out.argsrepr == "()"  # rendered by the worker, as proto1_to_proto2 does


def test_hybrid_headers_win():
    body = {"task": "t.x", "id": "from-body", "args": [1], "kwargs": {}}
    out = parse({"task": "t.x", "id": "from-headers"}, body)
    assert out.id == "from-headers" and out.args == [1]


@pytest.mark.parametrize("headers", [None, "junk", ["task"], 7])
def test_headers_not_a_mapping_is_unknown_message(headers):
    with pytest.raises(wire.UnknownMessage):
        parse(headers, [[], {}, None])


def test_v1_body_without_task_is_unknown_message():
    with pytest.raises(wire.UnknownMessage):
        parse({}, {"no": "task"})


@pytest.mark.parametrize("body", [
    "a string",                                # body that is not a list (crashes Celery 5.7)
    {"not": "a list"},
    [1, 2],                                    # wrong length
    ["args", {}, None],                        # args not a list
    [[], ["kwargs"], None],                    # kwargs not a mapping
    [[], {}, "embed"],                         # embed not a mapping
])
def test_malformed_v2_bodies_are_invalid(body):
    with pytest.raises(wire.InvalidTaskMessage):
        parse({"task": "t.x", "id": "1"}, body)


@pytest.mark.parametrize("field", ["eta", "expires"])
@pytest.mark.parametrize("value", ["not a date", "2026-13-45T00:00:00", 12, ["x"]])
def test_bad_eta_and_expires_are_invalid(field, value):
    with pytest.raises(wire.InvalidTaskMessage):
        parse({"task": "t.x", "id": "1", field: value}, [[], {}, None])


def test_naive_eta_is_utc():
    out = parse({"task": "t.x", "id": "1", "eta": "2030-01-01T10:00:00"}, [[], {}, None])
    assert out.eta == datetime(2030, 1, 1, 10, tzinfo=timezone.utc)


def test_invalid_json_is_undecodable():
    with pytest.raises(wire.BodyUndecodable):
        parse({"task": "t.x", "id": "1"}, b"{not json")


def test_pickle_to_a_json_worker_is_refused():
    with pytest.raises(codecs.ContentDisallowed):
        parse({"task": "t.x", "id": "1"}, b"\x80\x04N.",
              content_type="application/x-python-serialize")


def test_missing_id_is_invalid():
    with pytest.raises(wire.InvalidTaskMessage):
        parse({"task": "t.x"}, [[], {}, None])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(args=st.lists(json_values, max_size=5),
       kwargs=st.dictionaries(st.text(min_size=1), json_values, max_size=5))
def test_any_json_arguments_round_trip(args, kwargs):
    out = parse({"task": "t.x", "id": "1"}, [args, kwargs, None])
    assert json.dumps(out.args) == json.dumps(args)
    assert json.dumps(out.kwargs) == json.dumps(kwargs)


@given(headers=st.dictionaries(st.text(), json_values, max_size=8),
       body=st.binary(max_size=200))
def test_junk_never_escapes_as_an_unexpected_exception(headers, body):
    expected = (wire.UnknownMessage, wire.InvalidTaskMessage, wire.BodyUndecodable,
                codecs.ContentDisallowed)
    try:
        peeked = wire.peek(headers, body, "application/json", "utf-8", decode)
        wire.parse(peeked, headers, {}, {}, body, "application/json", "utf-8", decode,
                   worker_utc=True, worker_tz=timezone.utc)
    except expected:
        pass


@pytest.mark.parametrize("default", [False, None])
def test_redelivered_left_out_by_the_transport_is_the_release_default(app, default):
    """kombu's Redis leaves ``redelivered`` out: Celery 5.3+ says False, 5.2 None."""
    msg = app.amqp.as_task_v2("abc", "proj.add", args=(2, 3))
    raw = kombu_dumps(msg.body).encode()
    peeked = wire.peek(msg.headers, raw, "application/json", "utf-8", decode)
    out = wire.parse(peeked, msg.headers, {}, {"routing_key": "celery"}, raw,
                     "application/json", "utf-8", decode, worker_utc=True,
                     worker_tz=timezone.utc, redelivered_default=default)
    assert out.delivery_info["redelivered"] is default
    seen = wire.parse(peeked, msg.headers, {}, {"redelivered": True}, raw, "application/json",
                      "utf-8", decode, worker_utc=True, worker_tz=timezone.utc,
                      redelivered_default=default)
    assert seen.delivery_info["redelivered"] is True
