"""Wire-level differential scenarios: what a producer can observe of a worker.

Each test runs one client scenario against ``celery worker`` and against
``ccworker`` (``harness.run_differential``), on Redis and on RabbitMQ, with
the ``proj_wire`` project, and asserts the normalised observations are equal:
serializers and compression, protocol v1, routing (``task_routes``, ``-Q``,
``-X``, a topic exchange), ETA and expiry, retries, ``Reject``/``Ignore`` and
``acks_late``, and the canvas steps the worker itself performs (link, errback,
chain, group, chord). Results go to Redis in every case, so stored metas are
compared byte for byte (after the harness's normalisation).

Sanity assertions on the celery side come first in each test: they pin down
that the scenario observed what it meant to, so two equally broken
observation lists cannot pass, and they keep the file meaningful with
``CC_WORKERS=celery``.

Worker variants (each is one worker per side and broker, shared by the tests
that use it): the default; ``result_serializer=pickle``;
``task_acks_on_failure_or_timeout=False``; and two routing variants (``-Q``
and ``-X``). See ``projects/proj_wire/celery.py`` for the variables.
"""

from __future__ import annotations

import datetime
import decimal
import pickle
import time
import uuid

import pytest
import redis
from celery import chain, chord, group

from celerycompat.celery_release import reject_fails_task
from celerycompat.protocol.codecs import KOMBU_TYPED_JSON
from harness import GET_TIMEOUT, Raw, last_line, plain, ttl_bucket

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

PROJECT = "proj_wire"

#: A Celery worker refuses to start as root when it accepts pickle unless
#: ``C_FORCE_ROOT`` is set (``celery/platforms.py::check_privileges``); CI
#: containers run as root. It is set for both sides alike.
BASE_ENV = {"C_FORCE_ROOT": "1"}

#: ``-Q`` naming the default queue (the sentinel's), a direct queue from
#: ``task_queues``, the topic-exchange queue, and a queue that exists only
#: because ``-Q`` names it; ``<queue>.unconsumed`` is declared but left out.
SELECT_QUEUES = ("-Q", "{queue},{queue}.second,{queue}.topic,{queue}.adhoc")
#: ``-X``: every queue of ``task_queues`` except ``<queue>.excluded`` (and
#: ``<queue>.unconsumed``, which stays consumed here: it is only a name).
EXCLUDE_QUEUE = ("-X", "{queue}.excluded")

ROUTING_ENV = {"CC_WIRE_ROUTING": "1", "CC_WIRE_RESULT_EXTENDED": "1"}


def wire(run_differential, scenario, broker, env=None, **flags):
    """``run_differential`` on ``proj_wire`` with the base env plus ``env``."""
    return run_differential(scenario, broker, project=PROJECT,
                            env={**BASE_ENV, **(env or {})}, **flags)


# --------------------------------------------------------------------------
# Observation helpers
# --------------------------------------------------------------------------


def depth(observe, queue: str, label: str) -> None:
    """Ready messages in ``queue`` (LLEN on Redis, passive declare on AMQP)."""
    observe.record(label, observe.broker.queue_depth(queue))


def unacked(observe, label: str, timeout: float = 3.0) -> None:
    """Redis only: messages of this worker's queue kombu still holds as
    unacknowledged once the worker is idle (the ``unacked`` hash is shared
    by every worker on the db, so entries are counted by the queue name in
    their routing key). Polled until zero or ``timeout``: *when* an early
    ack reaches Redis is timing (Celery sends it from the next event-loop
    tick), a message never acked is behaviour."""
    if observe.broker.name != "redis":
        return
    client = redis.Redis.from_url(observe.broker.url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            count = sum(1 for v in client.hvals("unacked") if observe.queue.encode() in v)
            if count == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        client.close()
    observe.record(label, count)


def runs(observe, label: str, settle_for: float = 0.3) -> None:
    """How often each task ran (``run`` records), after letting the worker
    pick up anything wrongly requeued."""
    observe.settle()
    time.sleep(settle_for)
    entries = observe.records(label)
    counts: dict = {}
    for event, detail in entries:
        if event == "run":
            key = observe.task_ids.index(detail["id"]) + 1
            counts[f"task-{key}"] = counts.get(f"task-{key}", 0) + 1
    observe.record(label + ".runs", counts)


def pickle_meta(observe, task_id: str, label: str) -> None:
    """A pickled result meta: the decoded document with ``date_done`` masked
    and the traceback reduced to its last line, and - when there is no
    traceback, whose length differs by nature - the raw bytes with the date
    masked (same length on both sides, so the pickle framing is comparable)."""
    raw, ttl = observe.meta_raw(task_id)
    observe.record(label + ".ttl", ttl_bucket(ttl))
    if raw is None:
        observe.record(label + ".meta", None)
        return
    meta = pickle.loads(raw)
    date = meta.get("date_done")
    doc = {k: plain(v) for k, v in meta.items()}
    if date is not None:
        doc["date_done"] = f"<{type(date).__name__}>"
    if meta.get("traceback") is not None:
        doc["traceback"] = last_line(meta["traceback"])
    observe.record(label + ".meta", doc)
    if meta.get("traceback") is None:
        if isinstance(date, str):
            raw = raw.replace(date.encode(), b"<" + b"d" * (len(date) - 2) + b">")
        observe.record(label + ".raw", Raw(raw.decode("latin-1").encode(
            "unicode_escape").decode("ascii")))


def register_chain(observe, result) -> list:
    """Register the ids of a chain's results first step first; return them."""
    nodes = []
    while result is not None:
        nodes.append(result)
        result = result.parent
    nodes.reverse()
    for node in nodes:
        observe.register_id(node.id)
    return nodes


def text(obs, label: str) -> str:
    """An observation's normalised text as compared (``obs[label]`` parses
    JSON, which turns a raw meta back into a dict)."""
    return dict(obs.items)[label]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


SCALARS = (1, -2.5, "é ☃", [1, [2, None]], {"k": [True, False]}, None)


# --------------------------------------------------------------------------
# 1. Serializers, compression, kombu JSON types
# --------------------------------------------------------------------------


def test_serializers(broker, run_differential):
    """A worker accepting json, msgpack, yaml and pickle runs tasks sent with
    each; the task sees the types each serializer decodes to, and the result
    is stored as JSON."""

    def scenario(app, observe):
        for ser in ("json", "msgpack", "yaml", "pickle"):
            observe.get_and_meta(
                observe.send("typed", SCALARS, {"kw": "v"}, serializer=ser), ser
            )
        observe.get_and_meta(
            observe.send("typed", (b"\x00\xff", (1, 2)), serializer="pickle"),
            "pickle-only-types",
        )
        # A set arrives fine by pickle but cannot be stored as JSON: Celery
        # stores FAILURE with kombu's EncodeError instead of the result.
        observe.get_and_meta(observe.send("typed", ({3},), serializer="pickle"),
                             "unencodable-result")
        observe.get_and_meta(observe.send("typed", (b"bin", (1, 2)), serializer="msgpack"),
                             "msgpack-bytes")
        observe.get_and_meta(
            observe.send("typed", (datetime.datetime(2030, 1, 2, 3, 4, 5),
                                   datetime.date(2030, 1, 2)), serializer="yaml"),
            "yaml-dates",
        )
        observe.get_and_meta(observe.send("add", (2, 3), serializer="msgpack"), "msgpack-add")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["json"]["value"]["args"][0] == ["int", 1]
    assert celery_obs["msgpack"]["value"]["args"][3] == ["list", [1, [2, None]]]
    assert celery_obs["unencodable-result"]["value"]["exception"] == (
        "kombu.exceptions.EncodeError")
    if KOMBU_TYPED_JSON:  # kombu 5.2's JSON cannot store bytes, nor say "tuple"
        assert celery_obs["pickle-only-types"]["state"] == "SUCCESS"
        assert celery_obs["pickle-only-types"]["value"]["args"][1][0] == "tuple"
        assert celery_obs["msgpack-bytes"]["value"]["args"][0][0] == "bytes"
        assert celery_obs["yaml-dates"]["value"]["args"][0][0] == "datetime"
    assert celery_obs["msgpack-add"]["value"] == 5
    assert celery_obs == cc_obs


def test_compression(broker, run_differential):
    """Bodies compressed with zlib, bzip2, lzma (and the gzip alias), with the
    json and msgpack serializers."""

    def scenario(app, observe):
        big = "compressible " * 2000
        for comp in ("zlib", "gzip", "bzip2", "lzma"):
            observe.get_and_meta(
                observe.send("echo", (comp, big[:50]), {"n": 1}, compression=comp), comp
            )
        value = observe.get_and_meta(observe.send("echo", (big,), compression="zlib"),
                                     "zlib-big")
        observe.record("zlib-big.ok", value == [[big], {}])
        observe.get_and_meta(
            observe.send("typed", (b"\x01", 7), serializer="msgpack", compression="bzip2"),
            "msgpack-bzip2",
        )
        observe.get_and_meta(
            observe.send("typed", ((1, 2),), serializer="pickle", compression="lzma"),
            "pickle-lzma",
        )

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["zlib"]["value"] == [["zlib", ("compressible " * 5)[:50]], {"n": 1}]
    assert celery_obs["lzma"]["state"] == "SUCCESS"
    assert celery_obs["zlib-big.ok"] is True
    if KOMBU_TYPED_JSON:
        assert celery_obs["msgpack-bzip2"]["value"]["args"][0][0] == "bytes"
        assert celery_obs["pickle-lzma"]["value"]["args"][0][0] == "tuple"
    assert celery_obs == cc_obs


JSON_TYPED_ARGS = (
    datetime.datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc),
    datetime.datetime(2030, 1, 2, 3, 4, 5),
    datetime.date(2030, 1, 2),
    datetime.time(12, 30, 1),
    decimal.Decimal("1.50"),
    uuid.UUID("12345678-1234-5678-1234-567812345678"),
    b"utf8 \xc3\xa9",
    b"\x00\xff binary",
)


def test_kombu_json_types(broker, run_differential):
    """kombu's ``__type__`` envelopes as arguments (decoded for the task) and
    as return values created by the task (encoded by the worker)."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("typed", JSON_TYPED_ARGS,
                                          {"when": JSON_TYPED_ARGS[0]}), "args")
        observe.get_and_meta(observe.send("make_json_types"), "returned")
        observe.get_and_meta(observe.send("echo", JSON_TYPED_ARGS), "echoed")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    types = [t for t, _ in celery_obs["args"]["value"]["args"]]
    assert types == ["datetime", "datetime", "date", "time", "Decimal", "UUID",
                     "bytes", "bytes"]
    returned = celery_obs["returned"]["value"]
    assert returned["decimal"]["repr"] == "Decimal('-12.340')"
    assert returned["binary"]["type"] == "builtins.bytes"
    assert '"__type__": "decimal"' in text(celery_obs, "returned.raw")
    assert celery_obs == cc_obs


def test_pickle_results(broker, run_differential):
    """``result_serializer='pickle'``: values only pickle keeps (set, tuple,
    complex) and the exception object itself are stored pickled; tasks sent
    with each serializer still run."""

    def scenario(app, observe):
        for ser in ("json", "msgpack", "yaml", "pickle"):
            r = observe.send("typed", SCALARS, serializer=ser)
            observe.get(r, ser)
            pickle_meta(observe, r.id, ser)
        for name, args in (("make_pickle_types", ()), ("make_json_types", ()),
                           ("fail", ({"k": 1},))):
            r = observe.send(name, args)
            value = observe.get(r, name)
            if isinstance(value, dict):
                # ``plain`` shows a tuple as a list; the client's own types:
                observe.record(name + ".types",
                               {k: type(v).__name__ for k, v in sorted(value.items())})
            pickle_meta(observe, r.id, name)

    celery_obs, cc_obs = wire(run_differential, scenario, broker,
                              env={"CC_WIRE_RESULT_SERIALIZER": "pickle"})
    assert celery_obs["make_pickle_types"]["value"]["set"]["repr"] == "{1, 2, 3}"
    assert celery_obs["make_pickle_types.types"]["tuple"] == "tuple"
    assert celery_obs["make_json_types.types"]["decimal"] == "Decimal"
    assert celery_obs["fail"]["value"]["exception"] == "proj_wire.tasks.WireError"
    assert celery_obs["fail.meta"]["result"]["exception"] == "proj_wire.tasks.WireError"
    assert celery_obs["msgpack.meta"]["status"] == "SUCCESS"
    assert "make_json_types.raw" in celery_obs.labels()
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# 2. Protocol v1
# --------------------------------------------------------------------------


def test_protocol_v1(broker, run_differential):
    """A client with ``task_protocol=1`` (everything in the body, no ``task``
    header): args, kwargs, countdown, the request the task sees, a retry."""

    def scenario(app, observe):
        app.conf.task_protocol = 1
        # ``create_task_message`` is a cached property; the harness's sentinel
        # already built the v2 one.
        app.amqp.__dict__.pop("create_task_message", None)
        observe.record("client-protocol", app.amqp.create_task_message.__name__)
        observe.get_and_meta(observe.send("add", (2, 3)), "args")
        observe.get_and_meta(observe.send("echo", (1,), {"k": "é", "n": None}), "kwargs")
        start = time.monotonic()
        observe.get_and_meta(observe.send("when", countdown=1), "countdown")
        observe.record("countdown.waited", time.monotonic() - start >= 1.0)
        observe.get_and_meta(observe.send("request_fields", (1, "a"), {"k": [1]}), "request")
        observe.get_and_meta(observe.send("retry_until", (1,)), "retry")
        observe.get_and_meta(observe.send("fail", ("v1",)), "fail")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["client-protocol"] == "as_task_v1"
    assert celery_obs["args"]["value"] == 5
    assert celery_obs["countdown"]["value"] == {"has_eta": True, "not_early": True}
    assert celery_obs["countdown.waited"] is True
    assert celery_obs["request"]["value"]["args"] == [1, "a"]
    assert celery_obs["retry"]["value"] == {"retries": 1}
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# 3. Routing
# --------------------------------------------------------------------------


def test_routing_select_queues(broker, run_differential):
    """``task_routes`` to a second queue, to a queue bound to a topic
    exchange, and to a queue only ``-Q`` declares; a message to a declared
    queue outside ``-Q`` stays there. ``result_extended`` stores the queue."""

    def scenario(app, observe):
        q = observe.queue
        observe.get_and_meta(observe.send("routed_second"), "second")
        observe.get_and_meta(observe.send("routed_topic"), "topic-routed")
        observe.get_and_meta(
            observe.send("where", queue=q + ".topic", routing_key="wire.topic.explicit"),
            "topic-explicit",
        )
        observe.get_and_meta(observe.send("routed_adhoc"), "adhoc")
        depth(observe, q + ".unconsumed", "unconsumed-before")
        left = [observe.send("where", queue=q + ".unconsumed") for _ in range(2)]
        observe.settle()
        time.sleep(0.5)
        depth(observe, q + ".unconsumed", "unconsumed-after")
        observe.meta(left[0].id, "unconsumed-meta")
        for name in ("second", "topic", "adhoc"):
            depth(observe, f"{q}.{name}", f"{name}-depth")
        observe.queue_depth("default-depth")

    celery_obs, cc_obs = wire(run_differential, scenario, broker, env=ROUTING_ENV,
                              extra_flags=SELECT_QUEUES)
    assert celery_obs["second"]["value"]["routing_key"] == "<queue>.second"
    assert celery_obs["topic-routed"]["value"] == {
        "exchange": "<queue>.tx", "routing_key": "wire.topic.routed"}
    assert celery_obs["topic-explicit"]["value"]["routing_key"] == "wire.topic.explicit"
    assert celery_obs["adhoc"]["state"] == "SUCCESS"
    assert celery_obs["unconsumed-before"] in (0, -1)  # -1: not declared yet (AMQP)
    assert celery_obs["unconsumed-after"] == 2
    assert celery_obs["unconsumed-meta.ttl"] == "absent"
    assert celery_obs == cc_obs


def test_routing_exclude_queue(broker, run_differential):
    """``-X``: every ``task_queues`` entry but the excluded one is consumed."""

    def scenario(app, observe):
        q = observe.queue
        observe.get_and_meta(observe.send("routed_second"), "second")
        observe.get_and_meta(observe.send("routed_topic"), "topic")
        left = observe.send("where", queue=q + ".excluded")
        observe.settle()
        time.sleep(0.5)
        depth(observe, q + ".excluded", "excluded-depth")
        observe.meta(left.id, "excluded-meta")

    celery_obs, cc_obs = wire(run_differential, scenario, broker, env=ROUTING_ENV,
                              extra_flags=EXCLUDE_QUEUE)
    assert celery_obs["second"]["state"] == "SUCCESS"
    assert celery_obs["topic"]["value"]["routing_key"] == "wire.topic.routed"
    assert celery_obs["excluded-depth"] == 1
    assert celery_obs["excluded-meta.ttl"] == "absent"
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# 4. ETA, countdown, expires
# --------------------------------------------------------------------------


# Celery's gevent pool can start an ETA task a few milliseconds early: its
# timer counts down on gevent's loop clock, which lags the wall clock by the
# time since the loop last woke (docs/compat.md). For that worker alone, a
# lead this small counts as on time; ccworker is held to none at all.
CELERY_GEVENT_ETA_LEAD_MS = 50


def started_on_time(observe, result, label: str) -> None:
    """Record whether ``eta_lead`` ran no earlier than its ETA, and its state."""
    try:
        value = result.get(timeout=GET_TIMEOUT)
    except Exception as exc:  # recorded, so the diff shows it
        observe.record(label, repr(exc))
        return
    tolerated = 0
    if observe.worker.kind != "ccworker" and observe.worker.spec.pool == "gevent":
        tolerated = CELERY_GEVENT_ETA_LEAD_MS
    observe.record(label, {"has_eta": value["has_eta"], "state": result.state,
                           "not_early": value["lead_ms"] <= tolerated})


def test_eta_countdown(broker, run_differential):
    """``countdown`` and ``eta``: the task never starts before its ETA, and a
    task sent after them without an ETA is not held up by them."""

    def scenario(app, observe):
        start = time.monotonic()
        by_countdown = observe.send("eta_lead", countdown=1)
        by_eta = observe.send("eta_lead", eta=utcnow() + datetime.timedelta(seconds=1.5))
        plain_task = observe.send("when")
        observe.get_and_meta(plain_task, "no-eta")
        observe.record("no-eta.not-held", time.monotonic() - start < 1.0)
        started_on_time(observe, by_countdown, "countdown")
        observe.record("countdown.waited", time.monotonic() - start >= 1.0)
        started_on_time(observe, by_eta, "eta")
        observe.record("eta.waited", time.monotonic() - start >= 1.5)
        unacked(observe, "unacked-after")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["no-eta"]["value"] == {"has_eta": False, "not_early": True}
    assert celery_obs["no-eta.not-held"] is True
    on_time = {"has_eta": True, "not_early": True, "state": "SUCCESS"}
    assert celery_obs["countdown"] == on_time and celery_obs["eta"] == on_time
    assert celery_obs["countdown.waited"] is True and celery_obs["eta.waited"] is True
    assert celery_obs == cc_obs


def test_expires(broker, run_differential):
    """``expires`` in the past: REVOKED stored, the task never runs; in the
    future: it runs; passing while the task waits for its ETA: REVOKED."""

    def scenario(app, observe):
        past = observe.send("add", (1, 1), expires=utcnow() - datetime.timedelta(minutes=1))
        observe.get_and_meta(past, "past")
        future = observe.send("add", (2, 2), expires=utcnow() + datetime.timedelta(minutes=5))
        observe.get_and_meta(future, "future")
        relative = observe.send("add", (3, 3), expires=60)
        observe.get_and_meta(relative, "relative")
        during_eta = observe.send("add", (4, 4), countdown=1, expires=0.3)
        observe.get_and_meta(during_eta, "during-eta")
        observe.settle()
        observe.records("records")
        observe.queue_depth("queue-depth")
        unacked(observe, "unacked-after")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["past"]["state"] == "REVOKED"
    assert celery_obs["past"]["value"]["exception"] == "celery.exceptions.TaskRevokedError"
    assert '"status": "REVOKED"' in text(celery_obs, "past.raw")
    assert celery_obs["future"]["value"] == 4
    assert celery_obs["relative"]["value"] == 6
    assert celery_obs["during-eta"]["state"] == "REVOKED"
    assert celery_obs["queue-depth"] == 0
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# 5. Retries
# --------------------------------------------------------------------------


def test_retry(broker, run_differential):
    """``self.retry(countdown=0.2, max_retries=2)`` until success, until
    ``MaxRetriesExceededError``, and until the ``exc`` given is re-raised."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("retry_until", (2,)), "succeeds")
        observe.get_and_meta(observe.send("retry_until", (5,)), "max-retries")
        observe.get_and_meta(observe.send("retry_until", (5,), {"with_exc": True,
                                                                "max_retries": 1}),
                             "exc-reraised")
        runs(observe, "records")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["succeeds"]["value"] == {"retries": 2}
    assert celery_obs["max-retries"]["value"]["exception"] == (
        "celery.exceptions.MaxRetriesExceededError")
    assert celery_obs["exc-reraised"]["value"] == {
        "exception": "proj_wire.tasks.WireError", "args": ["again", 1]}
    assert celery_obs["records.runs"] == {"task-1": 3, "task-2": 3, "task-3": 2}
    assert celery_obs == cc_obs


def test_autoretry(broker, run_differential):
    """``autoretry_for=(KeyError,)``, ``retry_kwargs={'max_retries': 1}``."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("autoretry", (1,)), "succeeds")
        observe.get_and_meta(observe.send("autoretry", (5,)), "gives-up")
        runs(observe, "records")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["succeeds"]["value"] == {"retries": 1}
    assert celery_obs["gives-up"]["value"] == {
        "exception": "builtins.KeyError", "args": ["missing", 1]}
    assert celery_obs["records.runs"] == {"task-1": 2, "task-2": 2}
    assert celery_obs == cc_obs


def test_retry_meta_while_waiting(broker, run_differential):
    """The RETRY meta a polling client sees during a 2 s retry countdown,
    then SUCCESS."""

    def scenario(app, observe):
        result = observe.send("retry_until", (1,), {"countdown": 2, "with_exc": True})
        observe.poll_meta(result.id, "states")
        observe.get_and_meta(result, "final")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["states.count"] == 2
    assert celery_obs["states[0]"]["status"] == "RETRY"
    assert celery_obs["states[1]"]["status"] == "SUCCESS"
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# 6. Reject, Ignore, acks_late
# --------------------------------------------------------------------------


def test_reject_and_ignore(broker, run_differential):
    """``Reject(requeue=False)`` stores FAILURE (5.7; before, nothing) early-acked
    or with ``acks_late``; ``Ignore()`` stores nothing; neither is redelivered."""
    reject_stores = reject_fails_task()

    def scenario(app, observe):
        if reject_stores:
            observe.get_and_meta(observe.send("rejecting"), "reject")
            observe.get_and_meta(observe.send("rejecting_late"), "reject-late")
        else:  # nothing to wait for: the sentinel says both were handled
            rejected = [observe.send("rejecting"), observe.send("rejecting_late")]
            observe.settle()
            observe.meta(rejected[0].id, "reject")
            observe.meta(rejected[1].id, "reject-late")
        ignored = observe.send("ignoring")
        runs(observe, "records")
        observe.meta(ignored.id, "ignore")
        observe.queue_depth("queue-depth")
        unacked(observe, "unacked-after")
        observe.log_problems("log")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    if reject_stores:
        assert celery_obs["reject"]["state"] == "FAILURE"
        assert celery_obs["reject"]["value"]["exception"] == "celery.exceptions.Reject"
        assert celery_obs["reject-late"]["state"] == "FAILURE"
    elif broker.name == "redis":
        assert celery_obs["reject.ttl"] == celery_obs["reject-late.ttl"] == "absent"
    assert celery_obs["ignore.ttl"] == "absent"
    assert celery_obs["records.runs"] == {"task-1": 1, "task-2": 1, "task-3": 1}
    assert celery_obs["queue-depth"] == 0
    assert celery_obs == cc_obs


def test_acks_late(broker, run_differential):
    """``acks_late`` tasks that succeed and fail (acked either way by default),
    and one with ``acks_on_failure_or_timeout=False`` (rejected, not
    requeued): each runs once and the queue is empty afterwards."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("late_ok", (1,)), "ok")
        observe.get_and_meta(observe.send("late_fail", (2,)), "fail")
        observe.get_and_meta(observe.send("late_fail_noack", (3,)), "fail-noack")
        runs(observe, "records")
        # Redis only (``None`` on AMQP): is the message still un-acked while
        # the task body runs? With acks_late it must be; with an early ack
        # Celery acks "when the task starts" (B5), but through
        # ``Consumer.call_soon_ack`` -> ``hub.call_soon``, i.e. on the next
        # event-loop tick, which with the solo pool is after the task ran.
        # On the other pools the early ack and the task's start race each
        # other (both workers ack "when the task starts", from the consumer
        # while the task runs elsewhere): what the probe sees is timing.
        if observe.worker.spec.pool == "solo":
            observe.get(observe.send("ack_probe"), "early-ack.probe")
        observe.get(observe.send("ack_probe_late"), "late-ack.probe")
        if observe.worker.spec.pool == "solo":
            observe.get(observe.send("ack_probe", countdown=0.5), "early-ack-eta.probe")
        observe.queue_depth("queue-depth")
        unacked(observe, "unacked-after")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["ok"]["value"] == 1
    assert celery_obs["fail"]["state"] == "FAILURE"
    assert celery_obs["fail-noack"]["state"] == "FAILURE"
    assert celery_obs["records.runs"] == {"task-1": 1, "task-2": 1, "task-3": 1}
    assert celery_obs["queue-depth"] == 0
    on_redis = broker.name == "redis"
    assert celery_obs["late-ack.probe"]["value"] == {
        "unacked_while_running": True if on_redis else None}
    assert celery_obs == cc_obs


def test_acks_on_failure_setting_off(broker, run_differential):
    """``task_acks_on_failure_or_timeout=False``: a failing ``acks_late`` task
    is rejected without requeue (dropped), FAILURE still stored."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("late_fail", (1,)), "fail")
        observe.get_and_meta(observe.send("late_ok", (2,)), "ok")
        runs(observe, "records")
        observe.queue_depth("queue-depth")
        unacked(observe, "unacked-after")

    celery_obs, cc_obs = wire(run_differential, scenario, broker,
                              env={"CC_WIRE_ACKS_ON_FAILURE": "0"})
    assert celery_obs["fail"]["state"] == "FAILURE"
    assert celery_obs["records.runs"] == {"task-1": 1, "task-2": 1}
    assert celery_obs["queue-depth"] == 0
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# 7. Canvas steps the worker performs
# --------------------------------------------------------------------------


def _sig(observe, app, name, *args):
    """A signature of a project task with an id the scenario declared."""
    return app.signature(f"{PROJECT}.tasks.{name}", args=args).set(task_id=observe.new_id())


def test_link_callbacks(broker, run_differential):
    """One ``link`` callback, two (Celery groups them), and a link on a failing
    task (not called): all metas, including the parent's ``children``."""

    def scenario(app, observe):
        one = _sig(observe, app, "add", 10)
        parent = observe.send("add", (2, 3), link=one)
        observe.get_and_meta(parent, "one.parent")
        observe.get_stored_and_meta(one.id, "one.callback")

        first, second = _sig(observe, app, "add", 100), _sig(observe, app, "add", 200)
        parent = observe.send("add", (1, 1), link=[first, second])
        observe.get_and_meta(parent, "two.parent")
        observe.get_stored_and_meta(first.id, "two.first")
        observe.get_stored_and_meta(second.id, "two.second")

        unused = _sig(observe, app, "add", 1)
        failed = observe.send("fail", (1,), link=unused)
        observe.get_and_meta(failed, "on-failure.parent")
        observe.settle()
        observe.meta(unused.id, "on-failure.callback")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["one.callback"]["value"] == 15
    assert '"parent_id": "<task-2>"' in text(celery_obs, "one.callback.raw")
    assert '"children": [[["<task-1>", null], null]]' in text(celery_obs, "one.parent.raw")
    assert celery_obs["two.second"]["value"] == 202
    assert '"group_id": "<uuid-' in text(celery_obs, "two.first.raw")
    assert celery_obs["on-failure.callback.ttl"] == "absent"
    assert celery_obs == cc_obs


def test_link_error(broker, run_differential):
    """Errbacks: the inline form ``on_err(request, exc, traceback)`` (called
    in the worker, nothing published), the one-argument task form (published
    with the failed id), both on one task, and neither on success."""

    def scenario(app, observe):
        inline = app.signature(f"{PROJECT}.tasks.on_err_inline")
        observe.get_and_meta(observe.send("fail", (1,), link_error=inline), "inline.failed")

        errback = _sig(observe, app, "on_err_task")
        observe.get_and_meta(observe.send("fail", (2,), link_error=errback), "task.failed")
        observe.get_stored_and_meta(errback.id, "task.errback")

        both = _sig(observe, app, "on_err_task")
        observe.get_and_meta(observe.send("fail", (3,), link_error=[inline, both]),
                             "both.failed")
        observe.get_stored_and_meta(both.id, "both.errback")

        unused = _sig(observe, app, "on_err_task")
        observe.get_and_meta(observe.send("add", (1, 2), link_error=unused), "success")
        observe.settle()
        observe.meta(unused.id, "success.errback")
        observe.records("records")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["task.errback"]["value"] == {"failed": "<task-3>"}
    assert celery_obs["both.errback"]["state"] == "SUCCESS"
    assert celery_obs["success.errback.ttl"] == "absent"
    records = text(celery_obs, "records")
    assert records.count('"errback_inline"') == 2 and records.count('"errback_task"') == 2
    assert celery_obs == cc_obs


def test_chain(broker, run_differential):
    """A 3-step chain, and one whose middle step fails (Celery stores the
    same FAILURE under the remaining step's id)."""

    def scenario(app, observe):
        add = app.tasks[f"{PROJECT}.tasks.add"]
        fail = app.tasks[f"{PROJECT}.tasks.fail"]
        res = chain(add.s(1, 2), add.s(3), add.s(4)).apply_async()
        nodes = register_chain(observe, res)
        observe.get(res, "ok.result")
        for i, node in enumerate(nodes):
            observe.get_and_meta(node, f"ok.step{i}")

        res = chain(add.s(1, 2), fail.s(), add.s(4)).apply_async()
        nodes = register_chain(observe, res)
        observe.get(res, "failing.result")
        observe.settle()
        for i, node in enumerate(nodes):
            observe.get_and_meta(node, f"failing.step{i}")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["ok.result"]["value"] == 10
    assert '"parent_id": "<task-2>"' in text(celery_obs, "ok.step2.raw")
    assert celery_obs["failing.step1"]["state"] == "FAILURE"
    assert celery_obs["failing.step2"]["state"] == "FAILURE"
    assert celery_obs == cc_obs


def test_group(broker, run_differential):
    """A group of three (one failing member): ``group_id`` in every meta."""

    def scenario(app, observe):
        add = app.tasks[f"{PROJECT}.tasks.add"]
        fail = app.tasks[f"{PROJECT}.tasks.fail"]
        res = group(add.s(1, 1), fail.s("g"), add.s(3, 3)).apply_async()
        for child in res.results:
            observe.register_id(child.id)
        for i, child in enumerate(res.results):
            observe.get_and_meta(child, f"member{i}")

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["member0"]["value"] == 2
    assert celery_obs["member1"]["state"] == "FAILURE"
    assert '"group_id": "<uuid-1>"' in text(celery_obs, "member2.raw")
    assert celery_obs == cc_obs


def test_result_get_inside_a_task(broker, run_differential):
    """``result.get()`` inside a task fails with Celery's RuntimeError (the
    pool's ``task_join_will_block``), unless under ``allow_join_result()``.
    ccworker once left the flag off outside prefork children: such a task
    then blocked its slot, and every ``.delay()`` from a task subscribed to
    the result channel, which deadlocked Celery <= 5.4's Redis result
    consumer in a chord callback (the matrix caught it)."""

    def scenario(app, observe):
        # One after the other: the flag is process-wide, so a concurrent
        # allow_join_result() would lift it for the other thread too.
        observe.get_and_meta(observe.send("join_inside", (1, 2)), "refused")
        observe.get_and_meta(observe.send("join_allowed", (3, 4)), "allowed")
        observe.settle()

    celery_obs, cc_obs = wire(run_differential, scenario, broker, pool="threads", concurrency=2)
    assert celery_obs["refused"]["state"] == "FAILURE"
    assert celery_obs["refused"]["value"]["exception"] == "builtins.RuntimeError"
    assert celery_obs["allowed"]["value"] == 7
    assert celery_obs == cc_obs


def test_chord(broker, run_differential):
    """A chord of three (Redis result backend): the body gets the header's
    results; the header and body metas, and the chord counter keys, which
    Celery removes once the body is sent. Then a chord with a failing member
    (body FAILURE, ``ChordError``)."""

    def scenario(app, observe):
        add = app.tasks[f"{PROJECT}.tasks.add"]
        tsum = app.tasks[f"{PROJECT}.tasks.tsum"]
        fail = app.tasks[f"{PROJECT}.tasks.fail"]

        for label, header in (("ok", [add.s(i, i) for i in range(3)]),
                              ("failing", [add.s(1, 1), fail.s("c"), add.s(2, 2)])):
            body = tsum.s()
            res = chord(header, body).apply_async()
            parent = res.parent
            for child in parent.results:
                observe.register_id(child.id)
            observe.register_id(res.id)
            observe.get_and_meta(res, f"{label}.body")
            for i, child in enumerate(parent.results):
                observe.get_and_meta(child, f"{label}.header{i}")
            observe.settle()
            for suffix in (".j", ".t"):
                observe.record(f"{label}.counter{suffix}", ttl_bucket(
                    observe.results.ttl(f"celery-taskset-meta-{parent.id}{suffix}")))

    celery_obs, cc_obs = wire(run_differential, scenario, broker)
    assert celery_obs["ok.body"]["value"] == 6
    assert '"group_id": "<uuid-1>"' in text(celery_obs, "ok.header2.raw")
    assert celery_obs["failing.body"]["state"] == "FAILURE"
    assert celery_obs["failing.body"]["value"]["exception"] == "celery.exceptions.ChordError"
    assert celery_obs == cc_obs
