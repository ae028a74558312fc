"""Hostile and broken input: refused with a clear log line, and the worker keeps serving.

Every bad message here is published raw with kombu (``Observer.publish_raw``,
or a Redis envelope pushed straight onto the queue's list), bypassing
Celery's message building, to a running ``celery worker`` and a running
``ccworker``. Each scenario then sends an ordinary task and waits for it:
what is compared is what an operator and a client see of the bad message
(the WARNING/ERROR/CRITICAL log lines, a stored result if any, the
``task_rejected``/``task_unknown`` signals, what is left in the queue), and
that the next task still succeeds.

* ``LIKE_CELERY``: Celery 5.7 survives the message; ccworker must do exactly
  what it does (differential).
* ``CELERY_CRASHES``: Celery 5.7 itself dies on the message (``Unrecoverable
  error``, the message left in the queue to kill the next worker too) or,
  for a missing id, reconnects in a loop forever. ccworker rejects it as an
  invalid message (A24) with the reason in its log line; only ccworker runs.
* ``CELERY_MISBEHAVES``: Celery survives but runs nonsense (a string as the
  positional arguments is unpacked character by character); ccworker rejects.

All three are in docs/compat.md. Messages that test_foundation_differential.py
already compares (invalid JSON, an unknown task, a pickle body to a JSON-only
worker) and the survival checks of test_operations.py are not repeated.

Further down: transport envelopes on Redis, a pickle that would run code if
unpickled, the body size limit, junk remote-control messages, message
signing (Celery's ``auth`` serializer), ``worker_enable_remote_control =
False``, and passwords in broker URLs.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import subprocess
import uuid
from base64 import b64decode, b64encode
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from urllib.parse import unquote, urlsplit, urlunsplit

import pytest
import redis

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

ADD = "proj_basic.tasks.add"
ECHO = "proj_basic.tasks.echo"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
JSON = "application/json"
#: A header left out of the message altogether.
DROP = object()


def v2_headers(task_id: str, task: str = ADD) -> dict:
    """The headers a Celery 5.7 client sends for a protocol-2 task."""
    return {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": "(1, 2)", "kwargsrepr": "{}", "origin": "gen1@interop",
        "ignore_result": False,
    }


def body_of(args: Any = (1, 2), kwargs: Any = None, embed: Any = EMBED) -> bytes:
    return json.dumps([list(args) if isinstance(args, tuple) else args,
                       {} if kwargs is None else kwargs, embed]).encode()


def deep_list(depth: int) -> bytes:
    """``[[[...1...]]]``, ``depth`` lists deep, as bytes (no encoder recursion)."""
    return b"[" * depth + b"1" + b"]" * depth


def deep_mapping(depth: int) -> bytes:
    return b'{"a": ' * depth + b"1" + b"}" * depth


@dataclass(frozen=True)
class Hostile:
    """One bad message: header changes over a valid ``add(1, 2)``, and its body.

    ``refused`` is the reason ccworker gives in ``Received invalid task
    message: <reason>`` for the messages only ccworker is run with.
    """

    body: bytes = body_of()
    headers: dict = field(default_factory=dict)
    content_type: Optional[str] = JSON
    content_encoding: Optional[str] = "utf-8"
    task: str = ADD
    refused: str = ""

    def headers_for(self, task_id: str) -> dict:
        headers = v2_headers(task_id, self.task)
        for key, value in self.headers.items():
            if value is DROP:
                headers.pop(key, None)
            else:
                headers[key] = value
        return headers


LIKE_CELERY = {
    # -- the body's bytes: undecodable (A27, CRITICAL, acked) ------------------------
    "body-not-utf-8": Hostile(body=b"\xff\xfe[[1, 2], {}, null]"),
    "kombu-base64-envelope-not-base64": Hostile(
        body=b'[[{"__type__": "base64", "__value__": "abc"}], {}, null]', task=ECHO),
    "kombu-envelope-of-an-unknown-type": Hostile(
        body=b'[[{"__type__": "nope", "__value__": 1}], {}, null]', task=ECHO),
    "args-nested-100000-deep": Hostile(body=b"[[" + deep_list(100_000) + b"], {}, null]",
                                       task=ECHO),
    "kwargs-nested-100000-deep": Hostile(
        body=b'[[], {"k": ' + deep_mapping(100_000) + b"}, null]", task=ECHO),
    # Deep but within both decoders' limits: runs, and the result is stored.
    "args-nested-500-deep": Hostile(body=b"[[" + deep_list(500) + b"], {}, null]", task=ECHO),
    # -- content type and encoding: refused (A24, ContentDisallowed) ------------------
    "unknown-content-type": Hostile(content_type="application/x-nonsense"),
    "text-plain": Hostile(content_type="text/plain"),
    "yaml-to-a-json-only-worker": Hostile(body=b"- [1, 2]\n- {}\n- null\n",
                                          content_type="application/x-yaml"),
    # JSON bodies are read as UTF-8 whatever the encoding says: runs.
    "unknown-content-encoding": Hostile(content_encoding="x-no-such-codec"),
    # -- the task name -------------------------------------------------------------------
    # No ``task`` header: read as protocol 1, whose body must be a mapping (A26).
    "task-header-missing": Hostile(headers={"task": DROP}),
    # Looked up as is: unknown task, FAILURE NotRegistered(42) stored (A25).
    "task-name-a-number": Hostile(headers={"task": 42}),
    "task-name-null": Hostile(headers={"task": None}),
    # -- times: invalid (A24), same parser, same words -----------------------------------
    "eta-not-a-date": Hostile(headers={"eta": "tomorrow-ish"}),
    "eta-a-number": Hostile(headers={"eta": 1700000000}),
    "expires-not-a-date": Hostile(headers={"expires": "never"}),
    "expires-a-list": Hostile(headers={"expires": [1]}),
    # -- other headers of the wrong type: the task runs --------------------------------
    "retries-a-string": Hostile(headers={"retries": "many"}),
    "retries-negative": Hostile(headers={"retries": -3}),
    "timelimit-of-strings": Hostile(headers={"timelimit": ["a", "b"]}),
    "shadow-a-number": Hostile(headers={"shadow": 7}),
    "argsrepr-a-list": Hostile(headers={"argsrepr": [1]}),
    "ignore_result-a-string": Hostile(headers={"ignore_result": "yes"}),
    "root_id-and-parent_id-mappings": Hostile(headers={"root_id": {"a": 1},
                                                      "parent_id": {"b": 2}}),
    "stamped_headers-junk": Hostile(headers={"stamped_headers": "x", "stamps": [1]}),
    "group-a-number": Hostile(headers={"group": 5, "group_index": "x"}),
}

NOT_A_LIST = "task body is not a [args, kwargs, embed] list"
CELERY_CRASHES = {
    "empty-body": Hostile(body=b"", refused=NOT_A_LIST),
    "body-a-string": Hostile(body=b'"just a string"', refused=NOT_A_LIST),
    "body-a-number": Hostile(body=b"42", refused=NOT_A_LIST),
    "body-null": Hostile(body=b"null", refused=NOT_A_LIST),
    "body-a-mapping": Hostile(body=b'{"not": "a task"}', refused=NOT_A_LIST),
    "body-too-short": Hostile(body=b"[[1, 2], {}]", refused=NOT_A_LIST),
    "embed-not-a-mapping": Hostile(body=body_of(embed="x"),
                                   refused="task embed is not a mapping"),
    "task-name-a-list": Hostile(headers={"task": [ADD]},
                                refused="task name is not a string: ['proj_basic.tasks.add']"),
    # Celery counts tasks by this name: TypeError("unhashable type: 'dict'").
    "shadow-a-mapping": Hostile(headers={"shadow": {"a": 1}},
                                refused="shadow name is not a string: {'a': 1}"),
    # Celery: KeyError('id'), then reconnects and gets the message back, forever.
    "id-missing": Hostile(headers={"id": DROP}, refused="task message has no id"),
    "id-null": Hostile(headers={"id": None}, refused="task message has no id"),
    "id-a-number": Hostile(headers={"id": 12345}, refused="task id is not a string: 12345"),
    "id-a-list": Hostile(headers={"id": ["x"]}, refused="task id is not a string: ['x']"),
    "timelimit-a-string": Hostile(
        headers={"timelimit": "abc"},
        refused="invalid timelimit value 'abc': expected [hard, soft] in seconds"),
    "timelimit-a-number": Hostile(
        headers={"timelimit": 5},
        refused="invalid timelimit value 5: expected [hard, soft] in seconds"),
    "timelimit-too-long": Hostile(
        headers={"timelimit": [1, 2, 3]},
        refused="invalid timelimit value [1, 2, 3]: expected [hard, soft] in seconds"),
}

CELERY_MISBEHAVES = {
    # Celery runs add("1", "2") and stores "12".
    "args-a-string": Hostile(body=body_of(args="12"),
                             refused="Task positional arguments must be a list"),
    # Celery runs add("x"): FAILURE TypeError.
    "args-a-mapping": Hostile(body=body_of(args={"x": 1}),
                              refused="Task positional arguments must be a list"),
    # Celery acks it with a RuntimeWarning from inside its tracer, no rejection.
    "kwargs-not-a-mapping": Hostile(body=body_of(kwargs=[1, 2]),
                                    refused="Task keyword arguments is not a mapping"),
}


#: The ``task_rejected`` record of an invalid message (as the harness renders it).
REJECTED = '["task_rejected", {"exc": "InvalidTaskError"}]'


def hostile_scenario(message: Hostile):
    def scenario(app, observe):
        bad_id = observe.new_id()
        observe.publish_raw(message.body, content_type=message.content_type,
                            content_encoding=message.content_encoding,
                            headers=message.headers_for(bad_id), correlation_id=bad_id)
        observe.record("settled", observe.settle())
        observe.get_and_meta(observe.send("add", (1, 2)), "after")
        observe.meta(bad_id, "bad")
        observe.queue_depth("queue-depth")
        observe.records("records")
        observe.log_problems("log")
    return scenario


@pytest.fixture
def run_ccworker(request, worker_cache):
    """Run a scenario against ccworker alone (inputs Celery cannot survive)."""
    if "ccworker" not in harness.selected_kinds():
        pytest.skip("ccworker-only scenario (CC_WORKERS excludes ccworker)")
    worker_cache.used = []
    request.node._cc_workers = worker_cache.used

    def run(scenario, broker, env=None, **flags) -> harness.Observations:
        spec = harness.WorkerSpec(env=tuple(sorted((env or {}).items())), **flags)
        worker = worker_cache.get_many(("ccworker",), broker, spec)["ccworker"]
        return harness.run_side("ccworker", worker, scenario)

    return run


@pytest.mark.parametrize("name", list(LIKE_CELERY))
def test_hostile_message_like_celery(name, broker, run_differential):
    celery_obs, cc_obs = run_differential(hostile_scenario(LIKE_CELERY[name]), broker)
    assert celery_obs["after"]["value"] == 3
    assert celery_obs["worker_alive"] is True
    assert celery_obs == cc_obs


def assert_refused(obs: harness.Observations, message: Hostile) -> None:
    """Rejected as invalid (A24): Celery's log line with the reason, the
    ``task_rejected`` signal, no result, nothing left, the next task served."""
    assert obs["settled"] == "done"
    assert obs["log"][0] == f"ERROR Received invalid task message: {message.refused}"
    assert len(obs["log"]) == 1, obs["log"]
    assert REJECTED in obs["records"], obs["records"]
    assert obs["bad.raw"] is None
    assert obs["queue-depth"] == 0
    assert obs["after"]["value"] == 3
    assert obs["worker_alive"] is True


@pytest.mark.parametrize("name", list(CELERY_CRASHES) + list(CELERY_MISBEHAVES))
def test_hostile_message_celery_cannot_run(name, broker, run_ccworker):
    message = {**CELERY_CRASHES, **CELERY_MISBEHAVES}[name]
    assert_refused(run_ccworker(hostile_scenario(message), broker), message)


# --------------------------------------------------------------------------
# Transport envelopes (Redis): what kombu itself cannot turn into a message
# --------------------------------------------------------------------------


def redis_envelope(queue: str, task_id: str, *, body: Any = None, headers: Any = None,
                   drop: tuple = (), **changes) -> bytes:
    """kombu's Redis envelope for a valid ``add(1, 2)``, built by hand, then broken."""
    envelope: dict = {
        "body": b64encode(body_of()).decode() if body is None else body,
        "content-encoding": "utf-8", "content-type": JSON,
        "headers": v2_headers(task_id) if headers is None else headers,
        "properties": {
            "correlation_id": task_id, "reply_to": None, "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0, "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
    }
    for key in drop:
        if key in envelope:
            del envelope[key]
        else:
            del envelope["properties"][key]
    envelope.update(changes)
    return json.dumps(envelope).encode()


TRANSPORT = "CRITICAL Received and deleted a message the transport could not decode: "

#: ``name -> (envelope builder, the first line ccworker logs)``.
ENVELOPES = {
    "body-not-base64": (lambda q, i: redis_envelope(q, i, body="!!!not base64***"),
                        TRANSPORT + "Error("),
    "envelope-not-json": (lambda q, i: b'{"body": "not json', TRANSPORT + "JSONDecodeError("),
    "headers-not-a-mapping": (lambda q, i: redis_envelope(q, i, headers=["a", "list"]),
                              TRANSPORT + "AttributeError("),
    "no-properties": (lambda q, i: redis_envelope(q, i, drop=("properties",)),
                      TRANSPORT + "KeyError('properties')"),
    "headers-nested-100000-deep": (
        lambda q, i: redis_envelope(q, i).replace(
            b'"headers": {', b'"headers": {"deep": ' + deep_list(100_000) + b", ", 1),
        TRANSPORT + "RecursionError("),
    "no-delivery-tag": (lambda q, i: redis_envelope(q, i, drop=("delivery_tag",)),
                        TRANSPORT + "KeyError('delivery_tag')"),
    # No content type is kombu's raw ``application/data``: the body comes
    # through as bytes, not a task body.
    "no-content-type": (lambda q, i: redis_envelope(q, i, drop=("content-type",)),
                        f"ERROR Received invalid task message: {NOT_A_LIST}"),
}


def lpush(broker: harness.BrokerEnv, queue: str, item: bytes) -> None:
    client = redis.Redis.from_url(broker.url)
    try:
        client.lpush(queue, item)
    finally:
        client.close()


def unacked_for(broker: harness.BrokerEnv, queue: str) -> int:
    """kombu's ``unacked`` entries of ``queue``: a message held, never settled."""
    client = redis.Redis.from_url(broker.url)
    try:
        return sum(1 for value in client.hvals("unacked") if queue.encode() in value)
    finally:
        client.close()


@pytest.mark.parametrize("name", list(ENVELOPES))
def test_broken_redis_envelope(name, redis_available, run_ccworker):
    """Celery 5.7 dies on most of these (kombu raises inside its event loop:
    ``Unrecoverable error``, docs/compat.md); ccworker deletes the message
    with one CRITICAL line, as Celery does for an undecodable body (A27),
    and serves the next task."""
    build, first_line = ENVELOPES[name]
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))

    def scenario(app, observe):
        bad_id = observe.new_id()
        lpush(broker, observe.queue, build(observe.queue, bad_id))
        observe.record("settled", observe.settle())
        observe.get_and_meta(observe.send("add", (1, 2)), "after")
        observe.meta(bad_id, "bad")
        observe.queue_depth("queue-depth")
        # The last task's ack follows its stored result (it rides with the
        # next fetch, or goes within ACK_DELAY): a message never settled
        # stays in ``unacked``, one being acked leaves it at once.
        harness.wait_until(lambda: unacked_for(broker, observe.queue) == 0, 5)
        observe.record("unacked", unacked_for(broker, observe.queue))
        observe.log_problems("log")

    obs = run_ccworker(scenario, broker)
    assert obs["settled"] == "done"
    assert obs["log"][0].startswith(first_line), obs["log"]
    assert obs["bad.raw"] is None
    assert obs["queue-depth"] == 0 and obs["unacked"] == 0
    assert obs["after"]["value"] == 3
    assert obs["worker_alive"] is True


# --------------------------------------------------------------------------
# A pickle is never unpickled by a worker that does not accept pickle
# --------------------------------------------------------------------------


class _Trap:
    """Unpickling this creates a directory: the proof a worker unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickle_is_never_unpickled(broker, run_differential, tmp_path):
    markers = []

    def scenario(app, observe):
        marker = tmp_path / f"unpickled-{observe.worker.kind}"
        markers.append(marker)
        bad_id = observe.new_id()
        observe.publish_raw(pickle.dumps([[_Trap(str(marker))], {}, None]),
                            content_type="application/x-python-serialize",
                            content_encoding="binary", headers=v2_headers(bad_id, ECHO),
                            correlation_id=bad_id)
        observe.record("settled", observe.settle())
        observe.record("unpickled", marker.exists())
        observe.get_and_meta(observe.send("add", (1, 2)), "after")
        observe.meta(bad_id, "bad")
        observe.records("records")
        observe.log_problems("log")

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["unpickled"] is False
    assert celery_obs["log"] == ["ERROR Received invalid task message: Refusing to deserialize "
                                 "untrusted content of type pickle "
                                 "(application/x-python-serialize)"]
    assert celery_obs == cc_obs
    assert not any(marker.exists() for marker in markers)


# --------------------------------------------------------------------------
# The body size limit (ccworker only: Celery has none)
# --------------------------------------------------------------------------

LIMIT = 65536


def test_body_over_the_size_limit_is_refused_undecoded(broker, run_differential):
    """``CCWORKER_MAX_MESSAGE_BYTES``: a body over it is rejected as invalid,
    before it is decoded, with the sizes in the log line; one under it runs.
    Celery (which ignores the variable) runs both: the difference is the
    point (docs/compat.md), so each side is asserted on its own."""

    def scenario(app, observe):
        small = observe.send("echo", ("s" * (LIMIT // 2),))
        big = observe.send("echo", ("b" * (LIMIT + 1000),))
        observe.record("settled", observe.settle())
        observe.record("small", len(small.get(timeout=harness.GET_TIMEOUT)[0][0]))
        observe.record("big", big.state)
        observe.get_and_meta(observe.send("add", (1, 2)), "after")
        observe.queue_depth("queue-depth")
        observe.record("rejected", [entry for entry in observe.records("records")
                                    if entry[0] == "task_rejected"])
        observe.log_problems("log")

    celery_obs, cc_obs = run_differential(
        scenario, broker, env={"CCWORKER_MAX_MESSAGE_BYTES": str(LIMIT)})
    assert celery_obs["big"] == "SUCCESS"
    assert cc_obs["small"] == celery_obs["small"] == LIMIT // 2
    assert cc_obs["big"] == "PENDING"
    line = (rf"ERROR Received invalid task message: message body is 66,[0-9]{{3}} bytes, "
            rf"over the limit of {LIMIT:,} bytes \(CCWORKER_MAX_MESSAGE_BYTES\)")
    assert len(cc_obs["log"]) == 1 and re.fullmatch(line, cc_obs["log"][0]), cc_obs["log"]
    assert cc_obs["rejected"] == [["task_rejected", {"exc": "InvalidTaskError"}]]
    assert celery_obs["rejected"] == []
    assert cc_obs["queue-depth"] == 0
    assert cc_obs["after"]["value"] == 3 and cc_obs["worker_alive"] is True


# --------------------------------------------------------------------------
# Junk remote-control messages
# --------------------------------------------------------------------------

#: ``(method, arguments)`` sent with ``app.control.broadcast`` to one worker:
#: commands with missing, mistyped or nonsensical arguments, and an unknown
#: one. Both workers answer each with the same reply and log the same lines.
#: The limit and rate set here are reset at the end of the scenario.
CONTROL_JUNK = [
    ("no_such_command", {}),
    ("revoke", {}),
    ("rate_limit", {"task_name": ["x"], "rate_limit": "1/s"}),
    ("rate_limit", {"task_name": ADD, "rate_limit": {"a": 1}}),
    ("rate_limit", {"task_name": ADD, "rate_limit": "ten per second"}),
    ("time_limit", {"task_name": None}),
    # Stored on the task as sent, as Celery does; the next add() must still run.
    ("time_limit", {"task_name": ADD, "soft": "abc", "hard": [1]}),
    ("query_task", {}),
    ("query_task", {"ids": {"a": [1]}}),
    ("registered", {"taskinfoitems": [1, None, "__class__"]}),
    ("active", {"safe": "junk"}),
    ("revoke_by_stamped_headers", {"headers": "junk"}),
    ("revoke_by_stamped_headers", {"headers": {"k": {"nested": [1]}}}),
    ("pool_grow", {"n": "x"}),
    ("pool_shrink", {"n": "many"}),
    ("autoscale", {"max": "x"}),
    # A mapping's keys are merged, as Celery does (an older peer sends its
    # revoked set's ``{id: stamp}``).
    ("hello", {"from_node": "peer@x", "revoked": {"a": 1}}),
]

#: Junk ccworker answers differently (docs/compat.md): ``(method, arguments,
#: ccworker's reply)``. Celery keeps the junk ids as they are (a mapping is
#: an ``unhashable type`` error, ``None`` and ``5`` become revoked "ids" it
#: then fails to mark); ccworker revokes their text.
CONTROL_JUNK_DIFFERS = [
    ("revoke", {"task_id": {"a": 1}},
     {"ok": "tasks {\"{'a': 1}\"} flagged as revoked"}),
]


def _ask(app, node: str, method: str, arguments: dict, timeout: float = 3.0) -> list:
    return app.control.broadcast(method, arguments=arguments, destination=[node],
                                 reply=True, timeout=timeout, limit=1)


def control_scenario(app, observe):
    node = observe.worker.nodename
    for method, arguments in CONTROL_JUNK:
        replies = _ask(app, node, method, arguments)
        for reply in replies if isinstance(replies, list) else ():
            for answer in reply.values():
                if isinstance(answer, dict) and "clock" in answer:
                    answer["clock"] = "<clock>"  # each worker's own Lamport clock
        observe.record(f"{method} {json.dumps(arguments)}", replies)
    observe.record("ping after", _ask(app, node, "ping", {}))
    observe.get_and_meta(observe.send("add", (1, 2)), "after")
    observe.record("reset time_limit", _ask(app, node, "time_limit", {"task_name": ADD}))
    observe.record("reset rate_limit", _ask(app, node, "rate_limit",
                                            {"task_name": ADD, "rate_limit": None}))
    observe.log_problems("log")


def test_junk_control_commands(broker, run_differential):
    celery_obs, cc_obs = run_differential(control_scenario, broker)
    assert celery_obs["no_such_command {}"] == [
        {"<nodename>": {"error": "KeyError('no_such_command')"}}]
    assert celery_obs["ping after"] == [{"<nodename>": {"ok": "pong"}}]
    assert celery_obs["after"]["value"] == 3
    assert celery_obs == cc_obs


#: Bodies no client would send, published straight to the mailbox exchange
#: (``test_control.py`` sends a few more), with the error ccworker logs for
#: each. Celery resets its mailbox consumer after the first and loses what
#: was queued behind it, requests included (docs/compat.md); ccworker logs
#: each and answers the next request.
MAILBOX_JUNK = [
    ({"method": 5, "destination": ["{node}"]}, {}, None),
    ({"method": "ping", "destination": ["{node}"],
      "reply_to": {"exchange": 5, "routing_key": None}, "ticket": 1}, {},
     "ERROR Control command error: AttributeError(\"'int' object has no attribute 'startswith'\")"),
    ({"method": "ping", "destination": ["{node}"], "reply_to": "not a mapping"}, {},
     "ERROR Control command error: TypeError(\"string indices must be integers, not 'str'\")"),
    ({"method": "ping", "destination": ["{node}"], "arguments": ["a", "list"]}, {},
     "ERROR Control command error: AttributeError(\"'list' object has no attribute 'items'\")"),
    ({"method": "ping", "destination": ["{node}"]}, {"clock": "not a number"},
     "ERROR Control command error: TypeError(\"'>' not supported between instances of "
     "'str' and 'int'\")"),
    ({"method": "ping", "destination": ["{node}"], "pattern": ["x"], "matcher": 5}, {}, None),
]


def test_junk_mailbox_messages(broker, run_ccworker):
    def scenario(app, observe):
        node = observe.worker.nodename
        exchange = app.control.mailbox.exchange
        with app.connection_for_write() as connection:
            producer = connection.Producer(exchange=exchange)
            for body, headers, _ in MAILBOX_JUNK:
                body = json.loads(json.dumps(body).replace("{node}", node))
                producer.publish(body, exchange=exchange, routing_key="", headers=headers,
                                 declare=[exchange], serializer="json")
        for method, arguments, _ in CONTROL_JUNK_DIFFERS:
            observe.record(f"{method} {json.dumps(arguments)}",
                           _ask(app, node, method, arguments))
        observe.record("ping after", _ask(app, node, "ping", {}))
        observe.get_and_meta(observe.send("add", (1, 2)), "after")
        observe.log_problems("log")

    obs = run_ccworker(scenario, broker)
    for method, arguments, reply in CONTROL_JUNK_DIFFERS:
        assert obs[f"{method} {json.dumps(arguments)}"] == [{"<nodename>": reply}]
    assert obs["ping after"] == [{"<nodename>": {"ok": "pong"}}]
    assert obs["after"]["value"] == 3
    for _, _, line in MAILBOX_JUNK:
        if line is not None:
            assert line in obs["log"], obs["log"]


# --------------------------------------------------------------------------
# Message signing: Celery's ``auth`` serializer
# --------------------------------------------------------------------------


def _openssl_identity(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2",
                    "-subj", f"/CN=ccworker-interop-{name}"],
                   check=True, capture_output=True, timeout=60)
    return key, cert


@pytest.fixture(scope="module")
def security_dir(tmp_path_factory) -> Path:
    """A worker identity (key, certificate, a store trusting only it) and an
    intruder's (a key and certificate the store does not hold)."""
    directory = tmp_path_factory.mktemp("security")
    _, cert = _openssl_identity(directory, "worker")
    _openssl_identity(directory, "intruder")
    store = directory / "store"
    store.mkdir()
    (store / "worker.pem").write_bytes(cert.read_bytes())
    return directory


@contextlib.contextmanager
def kombu_registry_kept():
    """``setup_security`` (run by the client app here) changes kombu's
    process-wide registry: it registers ``auth``, makes it the default and
    disables every other decoder. Put it back for the tests that follow."""
    from kombu.serialization import registry

    saved = (dict(registry._encoders), dict(registry._decoders), dict(registry.type_to_name),
             dict(registry.name_to_type), set(registry._disabled_content_types),
             registry._default_encode, registry._default_content_type,
             registry._default_content_encoding)
    try:
        yield
    finally:
        (encoders, decoders, type_to_name, name_to_type, disabled, encode, content_type,
         content_encoding) = saved
        for target, value in ((registry._encoders, encoders), (registry._decoders, decoders),
                              (registry.type_to_name, type_to_name),
                              (registry.name_to_type, name_to_type),
                              (registry._disabled_content_types, disabled)):
            target.clear()
            target.update(value)
        registry._default_encode = encode
        registry._default_content_type = content_type
        registry._default_content_encoding = content_encoding


def _signer(directory: Path, name: str):
    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey
    from celery.security.serialization import SecureSerializer

    return SecureSerializer(PrivateKey((directory / f"{name}.key").read_text()),
                            Certificate((directory / f"{name}.pem").read_text()),
                            FSCertStore(str(directory / "store" / "*.pem")),
                            digest="sha256", serializer="json")


def _tampered(signed: bytes) -> bytes:
    """A genuinely signed payload whose body was changed after signing."""
    fields = b64decode(signed)
    assert fields.endswith(b"[[1, 2], {}, null]"), fields[-40:]
    return b64encode(fields[:-len(b"[[1, 2], {}, null]")] + b"[[7, 7], {}, null]")


def test_signed_messages(broker, run_differential, security_dir):
    """With ``app.setup_security()``: signed tasks run; an unsigned message is
    refused (``accept_content = ['auth']``), a message signed by a key the
    store does not trust and one changed after signing are undecodable
    (CRITICAL, acked). Same log lines and outcomes on both workers."""
    worker_signer = _signer(security_dir, "worker")
    intruder = _signer(security_dir, "intruder")
    body = [[1, 2], {}, None]

    def publish(observe, payload, content_type="application/data"):
        bad_id = observe.new_id()
        observe.publish_raw(payload, content_type=content_type, content_encoding="utf-8",
                            headers=v2_headers(bad_id, "proj_guard.tasks.add"),
                            correlation_id=bad_id)
        return bad_id

    def scenario(app, observe):
        observe.get_and_meta(observe.send("add", (2, 3)), "signed")
        unsigned = publish(observe, json.dumps(body).encode(), content_type=JSON)
        forged = publish(observe, intruder.serialize(body))
        tampered = publish(observe, _tampered(worker_signer.serialize(body)))
        observe.record("settled", observe.settle())
        for label, task_id in (("unsigned", unsigned), ("forged", forged),
                               ("tampered", tampered)):
            observe.meta(task_id, label)
        observe.get_and_meta(observe.send("add", (1, 1)), "after")
        observe.queue_depth("queue-depth")
        observe.records("records")
        observe.log_problems("log")

    with kombu_registry_kept():
        celery_obs, cc_obs = run_differential(
            scenario, broker, project="proj_guard",
            env={"CC_TEST_SECURITY_DIR": str(security_dir)})
    assert celery_obs["signed"]["value"] == 5 and celery_obs["after"]["value"] == 2
    log = celery_obs["log"]
    assert log[0] == ("ERROR Received invalid task message: Refusing to deserialize untrusted "
                      "content of type json (application/json)"), log
    assert log[1].startswith("CRITICAL Can't decode message body: DecodeError(SecurityError("), log
    assert log[2].startswith("CRITICAL Can't decode message body: DecodeError(SecurityError("), log
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# worker_enable_remote_control = False
# --------------------------------------------------------------------------


def test_remote_control_disabled(broker, run_differential):
    """No mailbox: a ping gets no answer, the node's pidbox queue does not
    exist, tasks run."""

    def scenario(app, observe):
        node = observe.worker.nodename
        observe.record("ping", app.control.broadcast("ping", destination=[node], reply=True,
                                                     timeout=1.5))
        observe.record("pidbox queue", pidbox_queue_exists(observe.broker, node))
        observe.get_and_meta(observe.send("add", (1, 2)), "after")
        observe.log_problems("log")

    celery_obs, cc_obs = run_differential(scenario, broker, project="proj_guard",
                                          env={"CC_TEST_REMOTE_CONTROL": "0"})
    assert celery_obs["ping"] == [] and celery_obs["pidbox queue"] is False
    assert celery_obs["after"]["value"] == 3
    assert celery_obs == cc_obs


def pidbox_queue_exists(broker: harness.BrokerEnv, node: str) -> bool:
    queue = f"{node}.celery.pidbox"
    if broker.name == "redis":
        client = redis.Redis.from_url(broker.url)
        try:
            return any(queue.encode() in member
                       for member in client.smembers("_kombu.binding.celery.pidbox"))
        finally:
            client.close()
    with broker.connection() as conn:
        channel = conn.channel()
        try:
            channel.queue_declare(queue=queue, passive=True)
            return True
        except Exception as exc:
            # 405 RESOURCE_LOCKED: it exists, exclusive to the worker's connection.
            return getattr(exc, "code", None) == 405


# --------------------------------------------------------------------------
# Passwords in broker and backend URLs
# --------------------------------------------------------------------------


@pytest.fixture
def redis_user(redis_available):
    """A Redis ACL user with a recognisable password, removed afterwards."""
    name, password = f"ccsecret-{uuid.uuid4().hex[:8]}", f"pw-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(harness.redis_base_url())
    client.acl_setuser(name, enabled=True, passwords=[f"+{password}"], keys=["*"],
                       channels=["*"], commands=["+@all"])
    try:
        yield name, password
    finally:
        client.acl_deluser(name)
        client.close()


def _with_credentials(url: str, name: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{name}:{password}@{host}", parts.path, "", ""))


@pytest.fixture(params=["redis", "amqp"])
def secret_broker(request, redis_user) -> harness.BrokerEnv:
    """The broker reached with a user whose password must never be shown:
    the Redis ACL user, or a RabbitMQ user made for the test (rabbitmqctl)."""
    name, password = redis_user
    if request.param == "redis":
        yield harness.BrokerEnv("redis", _with_credentials(
            harness.redis_db_url(harness.BROKER_DB), name, password))
        return
    url, shared = request.getfixturevalue("amqp_broker_url")
    ctl = harness.RabbitVhost()
    if shared or not ctl.available:
        pytest.skip("needs rabbitmqctl (CC_RABBITMQCTL) to create a RabbitMQ user")
    vhost = unquote(urlsplit(url).path.lstrip("/")) or "/"
    ctl._ctl("add_user", name, password)
    try:
        ctl._ctl("set_permissions", "-p", vhost, name, ".*", ".*", ".*")
        yield harness.BrokerEnv("amqp", _with_credentials(url, name, password))
    finally:
        with contextlib.suppress(Exception):
            ctl._ctl("delete_user", name)


def test_passwords_never_shown(secret_broker, redis_user, run_differential):
    """The broker and backend passwords are in neither worker's log (banner
    included) nor in the ``stats``, ``conf`` and ``report`` replies."""
    name, password = redis_user
    broker = secret_broker
    backend = _with_credentials(harness.redis_db_url(harness.RESULT_DB), name, password)

    def scenario(app, observe):
        node = observe.worker.nodename
        observe.get_and_meta(observe.send("add", (1, 2)), "after")
        for method in ("stats", "conf", "report"):
            replies = app.control.broadcast(method, destination=[node], reply=True,
                                            timeout=3.0, limit=1)
            observe.record(f"{method} replied", bool(replies))
            observe.record(f"{method} shows the password", password in json.dumps(replies))
        log = observe.worker.log()
        observe.record("log shows the password", password in log)
        observe.record("banner masks it", f"{name}:**@" in log)

    celery_obs, cc_obs = run_differential(scenario, broker, fresh=True,
                                          env={"CC_TEST_BACKEND": backend})
    assert celery_obs["after"]["value"] == 3
    assert celery_obs["stats replied"] and celery_obs["banner masks it"]
    assert not celery_obs["log shows the password"]
    assert celery_obs == cc_obs
