"""Fuzz: junk task messages never get past the protocol layer as anything but its errors.

Three properties, each driven by Hypothesis with generated messages (headers
of the right names with values of every type, bodies of arbitrary bytes,
JSON of every shape, v1 and v2 layouts, kombu type envelopes, deep nesting,
corrupted JSON, YAML and msgpack, content types and encodings of every
kind):

1. ``peek``/``parse`` with the worker's real decoder raise only the
   exceptions protocol/message.py documents, each mapped by the consumer to
   one of Celery's outcomes, and a message they accept has fields of the
   types the rest of the worker relies on;
2. the fast ISO-8601 path reads the same instant as Celery's parser;
3. end to end, a real consumer over kombu's in-process ``memory://``
   transport settles every junk message (acked, rejected, or held for its
   ETA), never dies, and runs the next ordinary task.

Budget: ``CCWORKER_FUZZ_EXAMPLES`` examples for the first property (default
1000, a few seconds) and a tenth of it, at least 50, for the end-to-end one.
A long run: ``CCWORKER_FUZZ_EXAMPLES=200000 pytest tests/unit/test_fuzz_protocol.py``
(docs/reliability.md#fuzzing has the count and time of the last one).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone

import msgpack
import pytest
from celery import Celery
from dateutil.parser import isoparse
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from celerycompat.consumer.consumer import Consumer
from celerycompat.consumer.decoder import make_decoder
from celerycompat.consumer.kombu_broker import KombuBroker
from celerycompat.execution.runner import RunSettings, TaskRunner
from celerycompat.pools.threads import ThreadPool
from celerycompat.protocol import codecs
from celerycompat.protocol import message as wire

EXAMPLES = int(os.environ.get("CCWORKER_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=list(HealthCheck))
FUZZ_END_TO_END = settings(max_examples=max(50, EXAMPLES // 10), deadline=None,
                           suppress_health_check=list(HealthCheck))
#: pytest-timeout's limit grows with the budget (a long run takes hours).
pytestmark = pytest.mark.timeout(max(300, EXAMPLES // 10))

#: What peek/parse may raise: each is one of Celery's outcomes (A24-A27).
DOCUMENTED = (wire.UnknownMessage, wire.InvalidTaskMessage, wire.BodyUndecodable,
              codecs.ContentDisallowed)

KNOWN = "t.known"
MAX_BYTES = 4096

# -- values ------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers()
           | st.integers(min_value=-(2 ** 80), max_value=2 ** 80) | st.floats()
           | st.text(max_size=30) | st.binary(max_size=20) | st.datetimes())
#: Any value a transport could put in a header (AMQP tables carry bytes,
#: timestamps and arrays; the memory transport carries any object).
junk = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner)
                   | st.dictionaries(st.text(max_size=8), inner, max_size=4)
                   | st.dictionaries(st.integers(), inner, max_size=2)),
    max_leaves=12)
#: Any value a JSON body can hold (NaN and infinities included: the stdlib writes them).
json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (st.lists(inner, max_size=4)
                   | st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)

iso_times = (st.datetimes(timezones=st.none() | st.just(timezone.utc)).map(datetime.isoformat)
             | st.text(alphabet="0123456789-:T.Z+ ", max_size=32))
seconds = st.none() | st.integers(-5, 10 ** 12) | st.floats() | st.text(max_size=4)

HEADER_FIELDS = {
    "task": st.sampled_from([KNOWN, "t.unknown", ""]) | junk,
    "id": st.uuids().map(str) | junk,
    "eta": iso_times | junk,
    "expires": iso_times | junk,
    "retries": st.integers() | junk,
    "timelimit": st.lists(seconds, min_size=0, max_size=3) | junk,
    "ignore_result": st.booleans() | junk,
    "shadow": st.text(max_size=10) | junk,
    "argsrepr": st.text(max_size=10) | junk,
    "kwargsrepr": st.text(max_size=10) | junk,
    "root_id": st.uuids().map(str) | junk,
    "parent_id": st.uuids().map(str) | junk,
    "group": junk, "group_index": junk, "origin": junk, "lang": junk,
    "stamped_headers": st.lists(st.text(max_size=5) | junk, max_size=3) | junk,
    "stamps": st.dictionaries(st.text(max_size=5), junk, max_size=3) | junk,
}
_OTHER_FIELDS = {key: value for key, value in HEADER_FIELDS.items() if key not in ("task", "id")}
#: v2 headers with a registered name and an id, then a few junk fields:
#: these reach ``parse``, where most of the validation is.
v2_headers = st.fixed_dictionaries(
    {"task": st.just(KNOWN), "id": st.uuids().map(str) | st.just("") | junk},
    optional=_OTHER_FIELDS)
#: Any subset of the header names with any values, plus unknown names.
any_headers = (st.fixed_dictionaries({}, optional=HEADER_FIELDS)
               .flatmap(lambda fields: st.dictionaries(st.text(max_size=8), junk, max_size=2)
                        .map(lambda extra: {**extra, **fields})))
headers = v2_headers | any_headers | junk

embeds = st.none() | json_junk | st.fixed_dictionaries({}, optional={
    key: json_junk for key in ("callbacks", "errbacks", "chain", "chord")})
v2_bodies = st.tuples(st.lists(json_junk, max_size=3) | json_junk,
                      st.dictionaries(st.text(max_size=8), json_junk, max_size=3) | json_junk,
                      embeds).map(list)
v1_bodies = st.fixed_dictionaries({}, optional={
    "task": st.sampled_from([KNOWN, "t.unknown"]) | json_junk,
    "id": st.uuids().map(str) | json_junk,
    "args": st.lists(json_junk, max_size=3) | json_junk,
    "kwargs": st.dictionaries(st.text(max_size=8), json_junk, max_size=3) | json_junk,
    "eta": iso_times | json_junk, "expires": iso_times | json_junk,
    "retries": json_junk, "timelimit": json_junk, "utc": json_junk,
    "callbacks": json_junk, "errbacks": json_junk, "chord": json_junk, "taskset": json_junk,
})
envelopes = st.fixed_dictionaries({
    "__type__": st.sampled_from(["datetime", "date", "time", "decimal", "uuid", "bytes",
                                 "base64", "nope"]) | st.text(max_size=8),
    "__value__": json_junk,
})
structured = v2_bodies | v1_bodies | json_junk | st.lists(envelopes, max_size=2).map(
    lambda args: [args, {}, None])


def _corrupt(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for index, value in flips:
        if out:
            out[index % len(out)] = value
    return bytes(out)


def _msgpack(value) -> bytes:
    try:
        return msgpack.packb(value)
    except (OverflowError, ValueError, TypeError):
        return b"\xc1"  # never used by msgpack: an undecodable body


json_bodies = structured.map(lambda value: json.dumps(value).encode())
deep_bodies = st.integers(1, 3000).flatmap(lambda n: st.sampled_from([
    b"[" * n + b"]" * n,
    b'[[' + b"[" * n + b"]" * n + b'], {}, null]',
    b'[[], {"k": ' + b'{"a": ' * n + b"1" + b"}" * n + b"}, null]",
    b"[" * n,
]))
corrupted = st.tuples(json_bodies, st.lists(st.tuples(st.integers(0, 10 ** 6),
                                                      st.integers(0, 255)),
                                            min_size=1, max_size=4)).map(lambda t: _corrupt(*t))
bodies = (json_bodies | v2_bodies.map(lambda value: json.dumps(value).encode())
          | deep_bodies | corrupted | st.binary(max_size=300)
          | st.text(max_size=200).map(str.encode)
          | structured.map(_msgpack))

content_types = st.just("application/json") | st.sampled_from([
    "application/json", "application/x-yaml", "application/x-msgpack",
    "application/x-python-serialize", "application/data", "application/text",
    "text/plain", None, "",
]) | st.text(max_size=20)
content_encodings = st.sampled_from(["utf-8", "binary", None, "base64", "x-nope", "latin-1",
                                     "utf-16", ""]) | st.text(max_size=10) | st.integers()

# -- 1. peek/parse ---------------------------------------------------------------------

#: The worker's real decoder: JSON, YAML (kombu: safe_load) and msgpack accepted,
#: never pickle (a generated pickle could run code); bodies over MAX_BYTES refused.
DECODE = make_decoder(["json", "yaml", "msgpack"], MAX_BYTES)


def assert_usable(message: wire.TaskMessage) -> None:
    """What the consumer, the pools and the runner rely on in an accepted message."""
    assert isinstance(message.id, str) and message.id
    hash(message.task)
    hash(message.name)  # counted by name (``inspect stats`` ``total``)
    assert isinstance(message.args, (list, tuple))
    assert isinstance(message.kwargs, dict)
    assert isinstance(message.embed, Mapping)
    assert isinstance(message.request, dict)
    for when in (message.eta, message.expires):
        assert when is None or (isinstance(when, datetime) and when.tzinfo is not None)
        if when is not None:
            when.timestamp()
    assert isinstance(message.retries, int)
    if message.timelimit is not None:
        assert isinstance(message.timelimit, tuple) and len(message.timelimit) == 2
        for limit in message.timelimit:
            assert limit is None or (not isinstance(limit, bool) and limit > 0
                                     and math.isfinite(limit))
    assert message.ignore_result in (None, True, False)
    assert all(isinstance(name, str) for name in message.stamped_headers)
    assert isinstance(message.stamps, dict)


#: The worker's timezone: naive times are UTC shown in it (far offsets move
#: dates near the calendar's ends past them).
WORKER_ZONES = [timezone.utc, timezone(timedelta(hours=-12)), timezone(timedelta(hours=14)),
                None]


def peek_and_parse(headers, body, content_type, content_encoding, properties=None,
                   delivery_info=None, worker_tz=timezone.utc):
    peeked = wire.peek(headers, body, content_type, content_encoding, DECODE)
    hash(peeked.task)
    if peeked.task != KNOWN:
        return None  # the consumer stops here: NotRegistered
    return wire.parse(peeked, headers, properties or {}, delivery_info or {}, body,
                      content_type, content_encoding, DECODE,
                      worker_utc=worker_tz is timezone.utc, worker_tz=worker_tz)


@FUZZ
@given(headers=headers, body=bodies, content_type=content_types,
       content_encoding=content_encodings,
       properties=st.dictionaries(st.sampled_from(["priority", "reply_to", "correlation_id"]),
                                  junk, max_size=3),
       delivery_info=st.dictionaries(st.sampled_from(["exchange", "routing_key",
                                                      "redelivered"]), junk, max_size=3),
       worker_tz=st.sampled_from(WORKER_ZONES))
def test_peek_and_parse_raise_only_documented_errors(headers, body, content_type,
                                                      content_encoding, properties,
                                                      delivery_info, worker_tz):
    try:
        message = peek_and_parse(headers, body, content_type, content_encoding, properties,
                                 delivery_info, worker_tz)
    except DOCUMENTED as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("unknown task" if message is None else "accepted")
    if message is not None:
        assert_usable(message)


@FUZZ
@given(headers=st.fixed_dictionaries({"task": st.just(KNOWN), "id": st.uuids().map(str)},
                                     optional=_OTHER_FIELDS),
       body=v2_bodies.map(lambda value: json.dumps(value).encode()),
       worker_tz=st.sampled_from(WORKER_ZONES))
def test_well_formed_v2_messages_with_junk_fields(headers, body, worker_tz):
    """Mostly valid messages, so that ``parse`` itself (not the decoder) sees the junk."""
    try:
        message = peek_and_parse(headers, body, "application/json", "utf-8",
                                 worker_tz=worker_tz)
    except DOCUMENTED as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("accepted")
    assert_usable(message)


def test_oversized_bodies_are_refused_before_decoding():
    calls = []

    def decode(body, content_type, content_encoding):
        calls.append(body)
        return [[], {}, None]

    limited = wire.limit_body_size(decode, 10)
    with pytest.raises(wire.BodyTooLarge, match="11 bytes, over the limit of 10 bytes"):
        limited(b"x" * 11, "application/json", "utf-8")
    assert calls == []
    assert limited(b"x" * 10, "application/json", "utf-8") == [[], {}, None]
    assert wire.limit_body_size(decode, None) is decode


# -- 2. the ISO-8601 fast path ---------------------------------------------------------------

offsets = st.none() | st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes)))


@FUZZ
@given(when=st.datetimes(timezones=offsets), micro=st.booleans())
def test_iso8601_fast_path_reads_what_dateutil_reads(when, micro):
    text = when.isoformat(timespec="microseconds" if micro else "seconds")
    ours, theirs = wire.parse_iso8601(text), isoparse(text)
    assert ours == theirs
    assert ours.utcoffset() == theirs.utcoffset()


@FUZZ
@given(text=st.text(alphabet="0123456789-:T.+Z ", max_size=35))
def test_iso8601_accepts_and_refuses_what_dateutil_does(text):
    try:
        theirs = isoparse(text)
    except Exception as exc:  # noqa: BLE001
        with pytest.raises(type(exc)):
            wire.parse_iso8601(text)
        return
    assert wire.parse_iso8601(text) == theirs


# -- 3. end to end: a real consumer on memory:// ------------------------------------------


class Worker:
    """A consumer + threads pool on ``memory://``, shared by every example."""

    def __init__(self) -> None:
        self.app = app = Celery(f"fuzz{uuid.uuid4().hex[:6]}", broker="memory://",
                                backend="cache+memory://", set_as_current=False)
        app.conf.task_default_queue = f"fuzz{uuid.uuid4().hex[:6]}"
        app.conf.broker_transport_options = {"polling_interval": 0.005}
        app.conf.accept_content = ["json", "yaml", "msgpack"]
        self.ran: set = set()

        @app.task(name=KNOWN)
        def known(*args, **kwargs):
            return None

        @app.task(name="t.sentinel")
        def sentinel(token):
            self.ran.add(token)

        app.finalize()
        runner = TaskRunner(app, RunSettings(hostname="fuzz@h"), lambda a, b: b)
        self.pool = ThreadPool(runner, 2)
        self.pool.start()
        self.consumer = Consumer(
            app=app, broker_factory=lambda: KombuBroker(app.connection_for_read()),
            pool=self.pool, store=app.backend,
            queues=list(app.amqp.queues.consume_from.values()),
            decode=make_decoder(app.conf.accept_content, MAX_BYTES), hostname="fuzz@h",
            prefetch_multiplier=4)
        self.errors: list = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.connection = app.connection_for_write()
        self.channel = self.connection.default_channel

    def _run(self) -> None:
        try:
            self.consumer.run()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            self.errors.append(exc)
            raise

    def publish(self, body, content_type, content_encoding, headers) -> None:
        """Straight onto the queue: kombu's producer would serialize or refuse junk."""
        message = self.channel.prepare_message(body, content_type=content_type,
                                               content_encoding=content_encoding,
                                               headers=headers)
        self.channel.basic_publish(message, exchange="",
                                   routing_key=self.app.conf.task_default_queue)

    def serves(self, timeout: float = 10.0) -> bool:
        token = uuid.uuid4().hex
        self.app.send_task("t.sentinel", (token,))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if token in self.ran:
                return True
            time.sleep(0.002)
        return False

    def unsettled(self) -> int:
        """Delivered messages neither acked nor rejected, minus those legitimately
        held (running, waiting for a slot, an ETA or a rate-limit token)."""
        consumer = self.consumer
        qos = consumer.broker._channel.qos
        delivered = len(qos._delivered) - len(qos._dirty)
        held = (sum(1 for request in list(consumer.active.values()) if not request.acked)
                + len(consumer.reserved) + len(consumer._eta)
                + len(consumer.rate_limited_requests()))
        return delivered - held

    def settles(self, timeout: float = 5.0) -> bool:
        """The consumer thread settles between polls: give it a few turns."""
        deadline = time.monotonic() + timeout
        while self.unsettled() != 0:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    def stop(self) -> None:
        self.consumer.should_stop = True
        self.thread.join(10)
        self.pool.stop()
        self.connection.release()


@pytest.fixture(scope="module")
def worker():
    worker = Worker()
    try:
        assert worker.serves(), "the consumer did not start"
        yield worker
    finally:
        worker.stop()


class EscapedErrors(logging.Handler):
    """Counts exceptions that escaped ``Consumer.on_delivery``.

    The kombu adapter logs, as its last resort, whatever its poll raised:
    kombu failing to build a message from a transport envelope is expected
    (headers that are not a mapping), an exception out of the consumer's
    own delivery handling is the bug this test looks for.
    """

    def __init__(self) -> None:
        super().__init__(logging.CRITICAL)
        self.escaped: list = []

    def emit(self, record: logging.LogRecord) -> None:
        if "could not decode" not in record.getMessage():
            return  # the consumer's own A27 line, not an escape
        tb = record.exc_info[2] if record.exc_info else None
        while tb is not None:
            if tb.tb_frame.f_code.co_name == "on_delivery":
                self.escaped.append(record.exc_info[1])
                return
            tb = tb.tb_next


@FUZZ_END_TO_END
@given(headers=headers, body=bodies, content_type=content_types,
       content_encoding=content_encodings)
def test_consumer_settles_junk_and_keeps_serving(worker, headers, body, content_type,
                                                  content_encoding):
    handler = EscapedErrors()
    logging.getLogger().addHandler(handler)
    try:
        worker.publish(body, content_type, content_encoding, headers)
        assert worker.serves(), "the next task did not run"
    finally:
        logging.getLogger().removeHandler(handler)
    assert not worker.errors, worker.errors
    assert worker.thread.is_alive()
    assert not handler.escaped, handler.escaped
    assert worker.settles(), f"{worker.unsettled()} message(s) neither settled nor held"
