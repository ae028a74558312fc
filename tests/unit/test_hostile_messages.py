"""protocol/message.py on the malformed fields that crash Celery 5.7, and the body size limit.

Each case names what Celery 5.7 does with the message (observed with
tests/interop/test_hostile_input.py) and what ccworker does instead; the
interop tests show the whole worker doing it.
"""

from __future__ import annotations

import json
import math
from datetime import timedelta, timezone

import pytest

from celerycompat.consumer.decoder import DEFAULT_MAX_MESSAGE_BYTES, make_decoder, max_message_bytes
from celerycompat.pools.procproto import time_limits
from celerycompat.protocol import message as wire

DECODE = make_decoder(["json"])
BODY = json.dumps([[1, 2], {}, None]).encode()


def parse(headers, body=BODY, decode=DECODE):
    headers = {"task": "t.x", "id": "1", **headers}
    peeked = wire.peek(headers, body, "application/json", "utf-8", decode)
    return wire.parse(peeked, headers, {}, {}, body, "application/json", "utf-8", decode,
                      worker_utc=True, worker_tz=timezone.utc)


# -- timelimit ---------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [
    (None, None), ([None, None], (None, None)), ([], None), (0, None), ("", None),
    ([10, 5], (10, 5)), ((1.5, None), (1.5, None)),
    # Inside the pair, what no timer can use is no limit (Celery's solo pool
    # runs these; its prefork pool would do arithmetic on them).
    (["a", "b"], (None, None)), ([True, 3], (None, 3)), ([-1, 0], (None, None)),
    ([math.nan, math.inf], (None, None)), ([1e300, 2], (None, 2)),
])
def test_timelimit_is_a_usable_pair(value, expected):
    assert parse({"timelimit": value}).timelimit == expected


@pytest.mark.parametrize("value", ["abc", 5, [1, 2, 3], {"hard": 1}])
def test_timelimit_that_is_not_a_pair_is_invalid(value):
    """Celery 5.7: ``Unrecoverable error`` (unpacking it in the consumer)."""
    with pytest.raises(wire.InvalidTaskMessage, match="invalid timelimit value"):
        parse({"timelimit": value})


@pytest.mark.parametrize("limit, expected", [
    ("abc", None), ([1], None), (True, None), (-5, None), (math.nan, None), (7, 7),
    ("7", 7.0), (2.5, 2.5),
])
def test_pools_ignore_junk_task_limits(limit, expected):
    """``control time_limit`` stores what the client sent; junk is no limit."""

    class Task:
        time_limit = limit
        soft_time_limit = limit

    assert time_limits(None, Task, None, None) == (expected, expected)
    assert time_limits((None, None), Task, 30, 20) == (expected or 30, expected or 20)


# -- id and name -------------------------------------------------------------------------


@pytest.mark.parametrize("value, reason", [
    (None, "task message has no id"), ("", "task message has no id"),
    (12345, "task id is not a string: 12345"), (["x"], "task id is not a string: ['x']"),
])
def test_an_id_that_is_not_a_string_is_invalid(value, reason):
    """Celery 5.7 dies on each (an unhashable id, a result key from a number...)."""
    with pytest.raises(wire.InvalidTaskMessage) as info:
        parse({"id": value})
    assert str(info.value) == reason


def test_a_missing_id_is_invalid():
    """Celery 5.7: KeyError('id'), then it reconnects and gets the message back, forever."""
    headers = {"task": "t.x"}
    peeked = wire.peek(headers, BODY, "application/json", "utf-8", DECODE)
    with pytest.raises(wire.InvalidTaskMessage, match="task message has no id"):
        wire.parse(peeked, headers, {}, {}, BODY, "application/json", "utf-8", DECODE,
                   worker_utc=True, worker_tz=timezone.utc)


@pytest.mark.parametrize("name", [["t.x"], {"t": 1}])
def test_an_unhashable_task_name_is_invalid(name):
    with pytest.raises(wire.InvalidTaskMessage, match="task name is not a string"):
        wire.peek({"task": name, "id": "1"}, BODY, "application/json", "utf-8", DECODE)


@pytest.mark.parametrize("name", [42, None, 1.5])
def test_a_hashable_task_name_is_looked_up(name):
    """As Celery: an unknown task, failed with NotRegistered(42) by the consumer."""
    assert wire.peek({"task": name, "id": "1"}, BODY, "application/json", "utf-8",
                     DECODE).task == name


@pytest.mark.parametrize("value, expected", [
    (None, None), (True, True), (False, False), ("yes", True), ("", False), (0, False),
])
def test_ignore_result_is_read_by_truthiness(value, expected):
    """Celery uses any value but None as the override."""
    assert parse({"ignore_result": value}).ignore_result is expected


@pytest.mark.parametrize("value, expected", [(3, 3), ("many", 0), (True, 0), (None, 0)])
def test_retries_is_an_int(value, expected):
    assert parse({"retries": value}).retries == expected


# -- eta and expires: Celery's parser, Celery's words ---------------------------------------


@pytest.mark.parametrize("value, words", [
    ("tomorrow-ish", "invalid literal for int() with base 10: b'tomo'"),
    (1700000000, "object of type 'int' has no len()"),
    ([1], "ISO string too short"),
    ("2026-13-01T00:00:00", "month must be in 1..12"),
])
def test_bad_times_are_refused_in_celerys_words(value, words):
    with pytest.raises(wire.InvalidTaskMessage) as info:
        parse({"eta": value})
    assert str(info.value) == f"invalid ETA value {value!r}: {words}"


def test_times_beyond_what_the_clock_can_represent_are_invalid():
    """A naive time is UTC, then shown in the worker's zone: year 1 minus 5 hours
    is no date at all (OverflowError), an invalid message, not a dead consumer."""
    headers = {"task": "t.x", "id": "1", "expires": "0001-01-01T00:00:00"}
    peeked = wire.peek(headers, BODY, "application/json", "utf-8", DECODE)
    with pytest.raises(wire.InvalidTaskMessage, match="invalid expires value"):
        wire.parse(peeked, headers, {}, {}, BODY, "application/json", "utf-8", DECODE,
                   worker_utc=False, worker_tz=timezone(timedelta(hours=-5)))


# -- the body size limit ------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_before_it_is_decoded():
    limited = make_decoder(["json"], 100)
    big = json.dumps([["x" * 200], {}, None]).encode()
    with pytest.raises(wire.BodyTooLarge) as info:
        parse({}, body=big, decode=limited)
    assert str(info.value) == (f"message body is {len(big):,} bytes, over the limit of "
                               "100 bytes (CCWORKER_MAX_MESSAGE_BYTES)")
    assert isinstance(info.value, wire.InvalidTaskMessage)  # rejected as invalid (A24)
    assert parse({}, decode=limited).args == [1, 2]


def test_protocol_1_bodies_are_limited_too():
    """The name of a v1 task is in its body: the limit applies before that decode."""
    body = json.dumps({"task": "t.x", "id": "1", "args": ["x" * 200]}).encode()
    with pytest.raises(wire.BodyTooLarge):
        wire.peek({}, body, "application/json", "utf-8", make_decoder(["json"], 100))


@pytest.mark.parametrize("environ, conf, expected", [
    ({}, {}, DEFAULT_MAX_MESSAGE_BYTES),
    ({"CCWORKER_MAX_MESSAGE_BYTES": "1000"}, {}, 1000),
    ({}, {"ccworker_max_message_bytes": 2000}, 2000),
    ({"CCWORKER_MAX_MESSAGE_BYTES": "1000"}, {"ccworker_max_message_bytes": 2000}, 1000),
    ({"CCWORKER_MAX_MESSAGE_BYTES": "0"}, {}, None),
    ({"CCWORKER_MAX_MESSAGE_BYTES": " "}, {"ccworker_max_message_bytes": 0}, None),
])
def test_the_limit_comes_from_the_environment_then_the_app(environ, conf, expected):
    assert max_message_bytes(conf, environ) == expected


@pytest.mark.parametrize("value", ["64MB", "-1", "1.5"])
def test_a_limit_that_is_not_a_number_of_bytes_stops_the_start(value):
    with pytest.raises(ValueError, match="expected a number of bytes"):
        max_message_bytes({}, {"CCWORKER_MAX_MESSAGE_BYTES": value})


def test_undecodable_codec_errors_never_escape_unwrapped():
    """kombu lets some errors through unwrapped (``.lower()`` on an encoding that
    is not a string): they are undecodable bodies, never a dead consumer."""
    decode = make_decoder(None)
    with pytest.raises(wire.BodyUndecodable):
        decode(b"\x00raw", "application/data", 5)
