"""celerycompat.protocol.codecs against kombu itself (the oracle).

Property tests: for generated values, our JSON bytes equal kombu's and our
decode of kombu's bytes equals kombu's decode (types included). Plus the
captured task bodies from a real Celery 5.7 producer.
"""

from __future__ import annotations

import base64
import bz2
import json
import lzma
import math
import pickle
import uuid
import zlib
from datetime import timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import serialization as kserial
from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError
from kombu.utils import json as kjson

from celerycompat.protocol import codecs

SAMPLES = Path("/work/shared/docs/wire-samples")
JSON = "application/json"
ACCEPT_JSON = frozenset({JSON})


# ---------------------------------------------------------------- helpers

def same(a, b) -> bool:
    """Equality that also requires equal types (1 != 1.0 != True) and nan == nan."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if hasattr(a, "tzinfo"):
        return a == b and a.tzinfo == b.tzinfo
    return a == b


def kombu_outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - we compare the failure kind
        return ("err", type(exc))


timezones = st.one_of(
    st.none(),
    st.just(dt_timezone.utc),
    st.integers(-23 * 60, 23 * 60).map(lambda m: dt_timezone(timedelta(minutes=m))),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x2FFFF)),
    st.datetimes(timezones=timezones),
    st.dates(),
    st.times(timezones=timezones),
    st.decimals(allow_nan=False),
    st.uuids(),
    st.binary(),
    st.text().map(lambda s: s.encode("utf-8")),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(st.text(max_size=8), inner, max_size=5),
    ),
    max_leaves=25,
)


# ---------------------------------------------------------------- encode

@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_json_encode_is_byte_identical_to_kombu(value):
    assert codecs.json_dumps(value) == kjson.dumps(value).encode("utf-8")
    ctype, cenc, payload = codecs.dumps(value, "json")
    k_ctype, k_cenc, k_payload = kserial.dumps(value, serializer="json")
    assert (ctype, cenc, payload) == (k_ctype, k_cenc, k_payload.encode("utf-8"))


def test_json_encode_special_objects_like_kombu():
    class WithJson:
        def __json__(self):
            return {"x": 1}

    class MyDatetime(type(kjson.datetime.now())):
        pass

    for value in (WithJson(), [MyDatetime(2020, 1, 1)], {"s": "\ud800"}, float("nan")):
        assert codecs.json_dumps(value) == kjson.dumps(value).encode("utf-8", "surrogatepass")


def test_json_encode_failure_is_kombu_encode_error():
    with pytest.raises(EncodeError):
        codecs.dumps(object(), "json")
    with pytest.raises(TypeError):
        codecs.json_dumps({1, 2})


@pytest.mark.parametrize("serializer", ["msgpack", "yaml", "pickle"])
def test_other_serializers_encode_like_kombu(serializer):
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": "é"}}
    ctype, cenc, payload = codecs.dumps(value, serializer)
    k_ctype, k_cenc, k_payload = kserial.dumps(value, serializer=serializer)
    if isinstance(k_payload, str):
        k_payload = k_payload.encode("utf-8")
    assert (ctype, cenc, payload) == (k_ctype, k_cenc, k_payload)


# ---------------------------------------------------------------- decode

@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(values)
def test_json_decode_matches_kombu(value):
    body = kjson.dumps(value).encode("utf-8")
    expected = kserial.loads(body, JSON, "utf-8", accept=ACCEPT_JSON)
    got = codecs.loads(body, JSON, "utf-8", ACCEPT_JSON)
    assert same(got, expected)


json_fragments = st.lists(
    st.sampled_from([
        "[", "]", "{", "}", ",", ":", '"', "1", "0", "-", ".", "e", "9" * 20, "NaN",
        "Infinity", "true", "null", " ", '"__type__"', '"__value__"', '"bytes"', '"uuid"',
        '"nope"', '"\\u005f_type__"', '"\\ud800"', '"\\u00e9"', '"hex"', "1e400", "\ufeff",
        '"2020-01-01"', '"datetime"', '"date"', '"time"', '"decimal"', '"base64"', '"AA=="',
    ]),
    max_size=30,
).map("".join)


@settings(max_examples=1500)
@given(json_fragments)
def test_json_decode_of_arbitrary_text_matches_kombu(text):
    body = text.encode("utf-8")
    expected = kombu_outcome(kserial.loads, body, JSON, "utf-8", ACCEPT_JSON)
    got = kombu_outcome(codecs.loads, body, JSON, "utf-8", ACCEPT_JSON)
    assert got[0] == expected[0]
    if got[0] == "ok":
        assert same(got[1], expected[1])
    else:
        assert got[1] is DecodeError and expected[1] is DecodeError


@pytest.mark.parametrize("text", [
    '{"__type__": "uuid", "__value__": {"hex": "12345678123456781234567812345678"}}',
    '{"\\u005f_type__": "decimal", "__value__": "1.5"}',
    '{"__type__": "decimal", "__value__": "1.5", "extra": 1}',
    '[123456789012345678901234567890, -9223372036854775809, 18446744073709551616]',
    '[NaN, Infinity, -Infinity, 1e400]',
    '["\\ud800", "\\u00e9", "\\ud83d\\ude00"]',
    '{"a": 1, "a": 2}',
])
def test_json_decode_edge_cases_match_kombu(text):
    body = text.encode("utf-8")
    assert same(codecs.loads(body, JSON, "utf-8", ACCEPT_JSON),
                kserial.loads(body, JSON, "utf-8", accept=ACCEPT_JSON))


@pytest.mark.parametrize("body", [
    b'{"__type__": "nope", "__value__": 1}',
    b'[{"__type__": "datetime", "__value__": "not a date"}]',
    b'[{"__type__": "bytes", "__value__": {"__type__": "bytes", "__value__": "x"}}]',
    b"\xef\xbb\xbf[1]",
    b'["\xff"]',
    b"[1,]",
    b"[" * 100000,
])
def test_json_decode_errors_are_decode_error_like_kombu(body):
    with pytest.raises(DecodeError):
        kserial.loads(body, JSON, "utf-8", accept=ACCEPT_JSON)
    with pytest.raises(DecodeError):
        codecs.loads(body, JSON, "utf-8", ACCEPT_JSON)


def test_json_decode_accepts_buffers_and_str():
    for body in (b"[1]", bytearray(b"[1]"), memoryview(b"[1]"), "[1]"):
        assert codecs.loads(body, JSON, "utf-8", ACCEPT_JSON) == [1]


def test_empty_body_is_returned_unchanged_like_kombu():
    assert codecs.loads(b"", JSON, "utf-8", ACCEPT_JSON) == kserial.loads(
        b"", JSON, "utf-8", accept=ACCEPT_JSON)


@pytest.mark.parametrize("serializer", ["msgpack", "yaml", "pickle"])
def test_other_serializers_decode_like_kombu(serializer):
    value = [[1, 2], {"k": "é", "b": b"\xff\x00" if serializer != "yaml" else "x"}, {"n": None}]
    ctype, cenc, payload = kserial.dumps(value, serializer=serializer)
    accept = codecs.prepare_accept([serializer])
    assert same(codecs.loads(payload, ctype, cenc, accept),
                kserial.loads(payload, ctype, cenc, accept=accept))


# ---------------------------------------------------------------- accept

def test_prepare_accept_normalises_names_and_mime_types():
    assert codecs.prepare_accept(["json", "application/x-yaml"]) == {
        "application/json", "application/x-yaml"}
    assert codecs.prepare_accept(None) is None
    with pytest.raises(Exception, match="No encoder/decoder installed for nope"):
        codecs.prepare_accept(["nope"])


def test_disallowed_content_raises_kombus_content_disallowed():
    payload = pickle.dumps([1])
    with pytest.raises(ContentDisallowed) as ours:
        codecs.loads(payload, "application/x-python-serialize", "binary", ACCEPT_JSON)
    with pytest.raises(ContentDisallowed) as theirs:
        kserial.loads(payload, "application/x-python-serialize", "binary", accept=ACCEPT_JSON)
    assert str(ours.value) == str(theirs.value)
    assert codecs.ContentDisallowed is ContentDisallowed


def test_trusted_raw_content_is_always_accepted():
    for ctype, cenc in (("application/data", "binary"), ("application/text", "utf-8"),
                        (None, "binary")):
        assert codecs.loads(b"raw", ctype, cenc, frozenset()) == kserial.loads(
            b"raw", ctype, cenc, accept=frozenset())


def test_no_accept_list_refuses_only_kombus_disabled_serializers():
    with pytest.raises(ContentDisallowed):
        codecs.loads(pickle.dumps(1), "application/x-python-serialize", "binary", None)
    assert codecs.loads(b"[1]", JSON, "utf-8", None) == [1]


# ---------------------------------------------------------------- compression

@pytest.mark.parametrize("header, compress", [
    ("application/x-gzip", zlib.compress), ("zlib", zlib.compress), ("gzip", zlib.compress),
    ("application/x-bz2", bz2.compress), ("bzip2", bz2.compress),
    ("application/x-lzma", lzma.compress), ("xz", lzma.compress),
])
def test_decompression_before_decode(header, compress):
    body = compress(b'[[1, 2], {}, {"x": null}]')
    assert codecs.loads(body, JSON, "utf-8", ACCEPT_JSON, compression=header) == [
        [1, 2], {}, {"x": None}]


def test_decompression_failures_are_decode_errors():
    with pytest.raises(DecodeError):
        codecs.loads(b"not zlib", JSON, "utf-8", ACCEPT_JSON, compression="zlib")
    with pytest.raises(DecodeError):
        codecs.loads(b"[1]", JSON, "utf-8", ACCEPT_JSON, compression="application/x-nope")


def test_result_payload_compression_matches_celery():
    from celery.backends.base import compress_payload, decompress_payload

    payload = codecs.json_dumps({"status": "SUCCESS", "result": "x" * 100})
    ours = codecs.compress_result_payload(payload, "zlib")
    assert ours == compress_payload(payload, "zlib")
    assert decompress_payload(ours) == payload


# ---------------------------------------------------------------- wire samples

def to_jsonable(obj):
    """The rendering capture.py used for ``body_decoded``."""
    if isinstance(obj, bytes):
        try:
            return obj.decode("utf-8")
        except UnicodeDecodeError:
            return {"__bytes_base64__": base64.b64encode(obj).decode()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else str(to_jsonable(k)): to_jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return {"__repr__": repr(obj)}


def sample_messages():
    for name in ("task-message-redis-json-types", "task-message-redis-zlib",
                 "task-message-redis-msgpack", "task-message-redis-yaml",
                 "task-message-redis-pickle", "task-message-redis"):
        path = SAMPLES / f"{name}.json"
        if not path.exists():
            continue
        data = json.loads(path.read_text())["data"]
        for queue in data["lists"].values():
            for entry in queue:
                if "body_decoded" in entry:
                    yield pytest.param(entry, id=name)


@pytest.mark.parametrize("entry", list(sample_messages()))
def test_wire_sample_bodies_decode_to_captured_value(entry):
    env = entry["envelope"]
    body = base64.b64decode(env["body"])
    ctype = env["content-type"]
    value = codecs.loads(body, ctype, env["content-encoding"],
                         codecs.prepare_accept([ctype]),
                         compression=env["headers"].get("compression"))
    if ctype == JSON:
        assert to_jsonable(value) == entry["body_decoded"]
    else:
        assert {"__decoded_repr__": repr(value)} == entry["body_decoded"]


def test_json_types_sample_revives_python_types():
    entry = next(e.values[0] for e in sample_messages() if e.id == "task-message-redis-json-types")
    body = base64.b64decode(entry["envelope"]["body"])
    args, kwargs, _embed = codecs.loads(body, JSON, "utf-8", ACCEPT_JSON)
    assert args[1] == uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert args[2] == b"raw-bytes" and args[3] == b"\xff\xfe"
    assert args[4] == Decimal("1.50")
    assert args[0].tzinfo is not None
