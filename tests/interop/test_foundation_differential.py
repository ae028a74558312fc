"""Foundation differential scenarios: ordinary tasks, as a client sees them.

Each test runs one client scenario against ``celery worker`` and against
``ccworker`` (see ``harness.run_differential``) on Redis and on RabbitMQ,
and asserts the normalised observations are identical: values returned by
``AsyncResult.get``, the raw bytes stored under ``celery-task-meta-<id>``
and their TTL, the order of hook and signal calls, what is left in the
queue, what the worker logs as a problem, and that the worker survived.

Sanity assertions on the celery side come first in each test: they pin down
that the scenario observed what it meant to (so a broken scenario cannot
make two empty observation lists compare equal), and they keep the suite
meaningful with ``CC_WORKERS=celery``.
"""

from __future__ import annotations

import datetime
import decimal
import time
import uuid

import pytest

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

UNICODE = "unicode ☃ é 日本語 \U0001f600 \\ \" '"


# --------------------------------------------------------------------------
# Values and failures
# --------------------------------------------------------------------------


def test_add(broker, run_differential):
    def scenario(app, observe):
        observe.get_and_meta(observe.send("add", (2, 3)), "add-int")
        observe.get_and_meta(observe.send("add", (0.5, -1)), "add-float")
        observe.get_and_meta(observe.send("add", ("a", "b")), "add-str")
        observe.get_and_meta(observe.send("add", ([1], [2, None])), "add-list")

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["add-int"]["value"] == 5
    assert celery_obs["add-list"]["value"] == [1, 2, None]
    assert celery_obs == cc_obs


def test_echo_every_json_type(broker, run_differential):
    """Every JSON type round-trips through the worker unchanged, in args and
    kwargs, including non-ASCII text (stored with ``\\u`` escapes by Celery)."""
    args = (
        0, -7, 2**62, 1.5, -0.0, 1e300, "", UNICODE, True, False, None,
        [], {}, [1, [2, [3, {"a": None}]]], {"nested": {"list": [1, 2.5, "x", False]}},
    )
    kwargs = {"k": "v", "é": ["ü", {"deep": [None, True]}], "n": None}

    def scenario(app, observe):
        observe.get_and_meta(observe.send("echo", args, kwargs), "echo-all")
        observe.get_and_meta(observe.send("echo"), "echo-nothing")

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["echo-all"]["value"][0][7] == UNICODE
    assert celery_obs["echo-all"]["value"][1] == kwargs
    assert celery_obs == cc_obs


def test_kwargs(broker, run_differential):
    def scenario(app, observe):
        observe.get_and_meta(observe.send("kwargs_task", (1,)), "defaults")
        observe.get_and_meta(
            observe.send("kwargs_task", (1, 5, 6, 7), {"c": 9, "z": "extra"}), "all-kinds"
        )
        observe.get_and_meta(observe.send("kwargs_task", (), {"a": 1, "b": 2}), "by-name")
        # ``apply_async`` checks the signature client-side; ``send_task`` does
        # not, so the worker sees the bad call and reports the TypeError.
        observe.get_and_meta(
            observe.send("kwargs_task", (), {"b": 2}, by_name=True), "missing-arg"
        )

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["all-kinds"]["value"] == {
        "a": 1, "b": 5, "rest": [6, 7], "c": 9, "extra": {"z": "extra"},
    }
    assert celery_obs["missing-arg"]["value"]["exception"] == "builtins.TypeError"
    assert celery_obs == cc_obs


def test_failures(broker, run_differential):
    """A builtin and a project-defined exception: stored ``exc_type``,
    ``exc_module``, ``exc_message``, and the class the client rebuilds."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("fail"), "valueerror")
        observe.get_and_meta(observe.send("fail_custom", ({"k": [1, 2]},)), "project-error")

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["valueerror"]["value"] == {
        "exception": "builtins.ValueError", "args": ["boom", 42],
    }
    assert celery_obs["project-error"]["value"]["exception"] == "proj_basic.tasks.ProjectError"
    assert celery_obs["project-error"]["state"] == "FAILURE"
    assert celery_obs == cc_obs


def test_big_results(broker, run_differential):
    """~1 MB results, compared by digest of the normalised raw bytes."""

    def scenario(app, observe):
        value = observe.get_and_meta(observe.send("big"), "big-string")
        observe.record("big-string.len", len(value) if isinstance(value, str) else None)
        value = observe.get_and_meta(observe.send("big_list", (50_000,)), "big-list")
        observe.record("big-list.len", len(value) if isinstance(value, list) else None)

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["big-string.len"] == 1_000_000
    assert celery_obs["big-list.len"] == 50_000
    assert celery_obs == cc_obs


def test_kombu_json_types(broker, run_differential):
    """datetime, date, time, UUID, Decimal, bytes travel as kombu's
    ``{"__type__": ..., "__value__": ...}`` envelopes; the worker must decode
    them for the task and encode them again in the result."""
    args = (
        datetime.datetime(2030, 1, 2, 3, 4, 5, 6, tzinfo=datetime.timezone.utc),
        datetime.datetime(2030, 1, 2, 3, 4, 5),
        datetime.date(2030, 1, 2),
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        decimal.Decimal("1.50"),
        b"raw-bytes",
    )

    def scenario(app, observe):
        observe.get_and_meta(
            observe.send("echo", args, {"t": datetime.time(12, 30)}), "typed"
        )

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["typed"]["value"][0][0]["type"] == "datetime.datetime"
    assert celery_obs["typed"]["value"][0][4]["repr"] == "Decimal('1.50')"
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# The request context, headers and shadow names
# --------------------------------------------------------------------------


def test_request_context(broker, run_differential):
    """What ``self.request`` holds for a plain call, one with a custom header,
    and one with a shadow name."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("request_info", (1, "a"), {"k": "v"}), "plain")
        observe.get_and_meta(
            observe.send("request_info", (2,), headers={"x-custom": "hdr", "x-n": 3}),
            "custom-header",
        )
        observe.get_and_meta(
            observe.send("request_info", (3,), shadow="proj.shadowed.name"), "shadow"
        )

    celery_obs, cc_obs = run_differential(scenario, broker)
    plain = celery_obs["plain"]["value"]
    assert plain["hostname"] == "<nodename>"
    assert plain["id"] == plain["correlation_id"] == plain["root_id"] == "<task-1>"
    assert plain["is_eager"] is False
    assert celery_obs["custom-header"]["value"]["x-custom"] == "hdr"
    assert celery_obs["shadow"]["value"]["shadow"] == "proj.shadowed.name"
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# What is (not) stored
# --------------------------------------------------------------------------


def test_ignore_result(broker, run_differential):
    """``ignore_result=True`` on the task and as a call option: no key."""

    def scenario(app, observe):
        by_task = observe.send("ignored", (21,))
        by_option = observe.send("add", (1, 1), ignore_result=True)
        observe.settle()
        observe.meta(by_task.id, "task-option")
        observe.meta(by_option.id, "call-option")
        # Per task: whether the second task's ``task_received`` comes before
        # or after the first task's hooks is a race on either worker.
        observe.records("records", per_task=True)

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["task-option.ttl"] == "absent"
    assert celery_obs["call-option.ttl"] == "absent"
    assert celery_obs == cc_obs


def test_track_started(broker, run_differential):
    """``track_started=True``: STARTED (with pid and hostname) is stored while
    the task runs, then SUCCESS."""

    def scenario(app, observe):
        result = observe.send("slow_started", (1.0,))
        observe.poll_meta(result.id, "states")
        observe.get_and_meta(result, "final")

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["states.count"] == 2
    assert celery_obs["states[0]"]["status"] == "STARTED"
    assert celery_obs["states[1]"]["status"] == "SUCCESS"
    assert celery_obs == cc_obs


def test_result_extended(broker, run_differential):
    """``result_extended=True``: name, args, kwargs, worker, retries, queue are
    stored too, and a client reads them back from ``AsyncResult``."""

    def read_back(app, observe, result, label):
        fresh = app.AsyncResult(result.id)
        observe.record(label + ".fields", {
            f: fresh._get_task_meta().get(f, "<missing>")
            for f in ("name", "args", "kwargs", "worker", "retries", "queue")
        })

    def scenario(app, observe):
        for label, result in (
            ("add", observe.send("add", (2, 3))),
            ("fail", observe.send("fail")),
            ("kwargs", observe.send("echo", (1,), {"k": UNICODE})),
            ("shadow", observe.send("add", (4, 4), shadow="proj.shadowed.add")),
        ):
            observe.get_and_meta(result, label)
            read_back(app, observe, result, label)

    celery_obs, cc_obs = run_differential(
        scenario, broker, env={"CC_TEST_RESULT_EXTENDED": "1"}
    )
    assert celery_obs["add.fields"]["worker"] == "<nodename>"
    assert celery_obs["add.fields"]["queue"] == "<queue>"
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# Hooks and signals
# --------------------------------------------------------------------------


def test_hook_and_signal_order(broker, run_differential):
    """Startup signals (on a worker started for this test) and the per-task
    order of ``task_received``, ``task_prerun``, ``before_start``,
    ``on_success``/``on_failure``, ``task_success``/``task_failure``,
    ``after_return``, ``task_postrun``.

    Per task: the client sends the second task once the first one's result
    is stored, and on a pool that runs tasks beside the consumer (threads,
    gevent, prefork) whether the first one's ``task_postrun`` comes before
    the second one's ``task_received`` is a race in Celery itself (CI saw
    both orders from ``celery worker -P gevent -c 1``)."""

    def scenario(app, observe):
        from harness import Lines

        observe.record("startup", Lines(observe.worker.startup_records))
        observe.get_and_meta(observe.send("hooked", (1,)), "hooked")
        observe.get_and_meta(observe.send("hooked_fail", (2,)), "hooked_fail")
        observe.records("records", per_task=True)

    celery_obs, cc_obs = run_differential(scenario, broker, fresh=True)
    startup = [line.split('"')[1] for line in celery_obs["startup"].splitlines()]
    assert startup[-1] == "worker_ready"
    assert "celeryd_init" in startup and "worker_init" in startup
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# RPC results (RabbitMQ only)
# --------------------------------------------------------------------------


def _raw_replies(observe, sends, expected: int, timeout: float = 20.0):
    """Send tasks with ``reply_to`` a queue we declared, and read the raw
    result messages the worker publishes there (body bytes, properties,
    headers), as a non-Python rpc client would."""
    from harness import Raw

    reply_queue = observe.queue + ".replies"
    with observe.broker.connection() as conn:
        channel = conn.channel()
        channel.queue_declare(queue=reply_queue, durable=False, auto_delete=False)
        try:
            for name, args in sends:
                observe.send(name, args, reply_to=reply_queue)
            got, deadline = [], time.monotonic() + timeout
            while len(got) < expected and time.monotonic() < deadline:
                message = channel.basic_get(reply_queue, no_ack=True)
                if message is None:
                    time.sleep(0.02)
                    continue
                got.append(message)
        finally:
            channel.queue_delete(reply_queue)
    for i, message in enumerate(got):
        props = dict(message.properties)
        observe.record(f"reply{i}.properties", {k: props[k] for k in sorted(props)})
        body = message.body
        if isinstance(body, bytes):  # py-amqp decodes when content_encoding is set
            body = body.decode("utf-8", "backslashreplace")
        observe.record(f"reply{i}.body", Raw(body))
    observe.record("replies", len(got))


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_rpc_results(broker, run_differential):
    """``rpc://`` results: what the client gets, and the raw reply messages."""

    def scenario(app, observe):
        observe.get(observe.send("add", (2, 3)), "add")
        observe.get(observe.send("fail"), "fail")
        observe.get(observe.send("fail_custom", ("x",)), "project-error")
        observe.get(observe.send("echo", (UNICODE, 1.5, None), {"k": [True]}), "echo")
        observe.get(observe.send("slow_started", (0.2,)), "started")
        _raw_replies(observe, [("add", (2, 3)), ("fail", ()), ("slow_started", (0.2,))], 4)

    celery_obs, cc_obs = run_differential(scenario, broker, backend="rpc")
    assert celery_obs["add"]["value"] == 5
    assert celery_obs["replies"] == 4
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# Messages the worker must refuse, and survive
# --------------------------------------------------------------------------


def test_unknown_task(broker, run_differential):
    """An unregistered task name: Celery stores FAILURE ``NotRegistered``,
    logs an error, rejects the message and carries on."""

    def scenario(app, observe):
        observe.get_and_meta(observe.send("proj_basic.tasks.nonexistent", (1,)), "unknown")
        observe.get_and_meta(observe.send("add", (1, 2)), "after")
        observe.queue_depth("queue-depth")
        observe.records("records")
        observe.log_problems("log")

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["unknown"]["value"]["exception"] == "celery.exceptions.NotRegistered"
    assert celery_obs["after"]["value"] == 3
    assert celery_obs == cc_obs


def _v2_headers(task: str, task_id: str) -> dict:
    return {
        "lang": "py", "task": task, "id": task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None,
        "argsrepr": "(1, 2)", "kwargsrepr": "{}", "origin": "gen1@interop",
        "ignore_result": False,
    }


def test_invalid_json_body(broker, run_differential):
    """A protocol-2 message whose body is not JSON, published raw with kombu:
    the worker must not die, must not keep the message, and must run the
    next task."""

    def scenario(app, observe):
        bad_id = observe.new_id()
        observe.publish_raw(
            b'[[1, 2], {}, {"callbacks": null', content_type="application/json",
            headers=_v2_headers("proj_basic.tasks.add", bad_id), correlation_id=bad_id,
        )
        observe.get_and_meta(observe.send("add", (1, 2)), "after")
        observe.settle()
        observe.meta(bad_id, "bad")
        observe.queue_depth("queue-depth")
        observe.records("records")
        observe.log_problems("log")

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["after"]["value"] == 3
    assert celery_obs["worker_alive"] is True
    assert celery_obs == cc_obs


def test_pickle_to_json_only_worker(broker, run_differential):
    """A pickle-serialized task to a worker accepting only JSON (the default):
    refused with ``ContentDisallowed``, nothing stored, worker continues."""

    def scenario(app, observe):
        refused = observe.send("add", (1, 2), serializer="pickle")
        observe.get_and_meta(observe.send("add", (2, 2)), "after")
        observe.settle()
        observe.meta(refused.id, "refused")
        observe.queue_depth("queue-depth")
        observe.records("records")
        observe.log_problems("log")

    celery_obs, cc_obs = run_differential(scenario, broker)
    assert celery_obs["refused.ttl"] == "absent"
    assert celery_obs["after"]["value"] == 4
    assert celery_obs == cc_obs


# --------------------------------------------------------------------------
# The threads pool
# --------------------------------------------------------------------------


def test_threads_pool(broker, run_differential):
    """``-P threads -c 4``: concurrent tasks, same results and stored bytes."""

    def scenario(app, observe):
        results = [observe.send("add", (i, i)) for i in range(8)]
        results.append(observe.send("fail"))
        for i, result in enumerate(results):
            observe.get_and_meta(result, f"r{i}")

    celery_obs, cc_obs = run_differential(scenario, broker, pool="threads", concurrency=4)
    assert celery_obs["r7"]["value"] == 14
    assert celery_obs == cc_obs
