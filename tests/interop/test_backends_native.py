"""Native result stores vs Celery's own backend, on real Redis and RabbitMQ.

Each test stores the same inputs twice - once through Celery's
``app.backend.mark_as_*`` and once through our store - and compares what a
Celery client would see: the stored bytes (task id and date_done masked),
the TTL, the published/replied message, and ``AsyncResult.get()``.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid

import pytest
import redis
from celery import Celery, states
from celery.app.task import Context
from celery.backends.base import decompress_payload

import harness
from celerycompat.backends import AppBackendStore, group_commit, result_store_for, riding_acks
from celerycompat.backends import redis as redis_backend
from celerycompat.backends.redis import RedisResultStore, WriteItem
from celerycompat.backends.rpc import RPCResultStore

#: The scratch db of this pytest process: every test here FLUSHes it.
REDIS_URL = harness.redis_db_url(harness.SCRATCH_DB)
AMQP_URL = harness.amqp_url()
ALL_CONTENT = ["json", "msgpack", "yaml", "pickle"]


# A missing broker ends the session (conftest), as for every interop test:
# never a skip, so a green run always compared something.
pytestmark = [pytest.mark.interop, pytest.mark.usefixtures("redis_available")]


@pytest.fixture
def rdb():
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


def redis_app(**conf) -> Celery:
    app = Celery("interop", backend=REDIS_URL, broker="memory://", set_as_current=False)
    app.conf.update(accept_content=ALL_CONTENT, result_accept_content=ALL_CONTENT, **conf)
    return app


def new_id() -> str:
    return str(uuid.uuid4())


def request_for(task_id, **extra):
    fields = dict(
        id=task_id, task="proj.add", args=[1, 2], kwargs={"k": "é"}, hostname="w@h",
        retries=1, delivery_info={"routing_key": "celery"}, reply_to=None,
        correlation_id=task_id,
    )
    fields.update(extra)
    return Context(**fields)


def masked(app, raw: bytes, task_id: str) -> bytes:
    """Stored payload with its task id and date_done replaced by placeholders."""
    raw = decompress_payload(raw)
    meta = app.backend.decode(raw)
    raw = raw.replace(task_id.encode(), b"<TID>")
    if meta.get("date_done"):
        raw = raw.replace(meta["date_done"].encode(), b"<DATE>")
    return raw


def store_both(app, call, *args, **kwargs):
    """Run ``call`` (a mark_as_* name) on Celery's backend and on our store,
    each with its own task id; returns ``{"celery": id, "ours": id}``."""
    store = result_store_for(app)
    assert isinstance(store, RedisResultStore)
    ids = {}
    for side, target in (("celery", app.backend), ("ours", store)):
        tid = ids[side] = new_id()
        getattr(target, call)(tid, *args, request=request_for(tid), **kwargs)
    return ids


def compare_stored(app, rdb, ids):
    keys = {side: app.backend.get_key_for_task(tid) for side, tid in ids.items()}
    raw = {side: rdb.get(key) for side, key in keys.items()}
    assert raw["celery"] is not None and raw["ours"] is not None
    assert masked(app, raw["ours"], ids["ours"]) == masked(app, raw["celery"], ids["celery"])
    ttl = {side: rdb.ttl(key) for side, key in keys.items()}
    assert abs(ttl["ours"] - ttl["celery"]) <= 1, ttl
    return raw, ttl


# ------------------------------------------------------------------ Redis

SETTINGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"result_extended": True}, id="extended"),
    pytest.param({"result_expires": 0}, id="no-expiry"),
    pytest.param({"result_expires": 120, "result_failure_expires": 30}, id="failure-expires"),
    pytest.param({"result_compression": "zlib"}, id="compressed"),
    pytest.param({"result_serializer": "msgpack"}, id="msgpack"),
    pytest.param({"result_serializer": "pickle"}, id="pickle"),
    pytest.param({"result_serializer": "yaml"}, id="yaml"),
    pytest.param({"result_backend_transport_options": {"global_keyprefix": "pfx"}},
                 id="global-keyprefix"),
]


@pytest.mark.parametrize("conf", SETTINGS)
def test_redis_done_matches_celery(rdb, conf):
    app = redis_app(**conf)
    result = {"sum": 3, "items": [1, 2.5, None, "é"]}
    ids = store_both(app, "mark_as_done", result)
    compare_stored(app, rdb, ids)


@pytest.mark.parametrize("conf", SETTINGS)
def test_redis_failure_matches_celery(rdb, conf):
    app = redis_app(**conf)
    ids = store_both(app, "mark_as_failure", ValueError("boom", 42), "Traceback: ...")
    _, ttl = compare_stored(app, rdb, ids)
    if conf.get("result_failure_expires"):
        assert 25 <= ttl["ours"] <= 30


@pytest.mark.parametrize("conf", SETTINGS[:5])
def test_redis_retry_and_revoked_match_celery(rdb, conf):
    app = redis_app(**conf)
    compare_stored(app, rdb, store_both(app, "mark_as_retry", KeyError("k"), "tb"))
    compare_stored(app, rdb, store_both(app, "mark_as_revoked", "expired"))


def test_redis_started_matches_celery_tracer(rdb):
    # Celery's tracer stores STARTED via store_result(..., request=...).
    app = redis_app(result_extended=True)
    store = result_store_for(app)
    ids = {"celery": new_id(), "ours": new_id()}
    meta = {"pid": 123, "hostname": "w@h"}
    app.backend.store_result(ids["celery"], meta, states.STARTED,
                             request=request_for(ids["celery"], group="g1", parent_id="p1"))
    store.mark_as_started(ids["ours"], meta, request_for(ids["ours"], group="g1", parent_id="p1"))
    raw, _ = compare_stored(app, rdb, ids)
    assert b'"date_done": null' in raw["ours"]


@pytest.mark.parametrize("conf", [{}, {"result_serializer": "msgpack"},
                                  {"result_compression": "zlib"}])
def test_success_is_sticky(rdb, conf):
    app = redis_app(**conf)
    store = result_store_for(app)
    tid = new_id()
    app.backend.mark_as_done(tid, 42, request=request_for(tid))
    before = rdb.get(app.backend.get_key_for_task(tid))
    store.mark_as_failure(tid, ValueError("late"), "tb", request_for(tid))
    store.mark_as_revoked(tid, "late", request_for(tid))
    store.mark_as_done(tid, 43, request_for(tid))
    assert rdb.get(app.backend.get_key_for_task(tid)) == before


def test_batched_writes_survive_a_flushed_script_cache(rdb):
    """The group-commit pipeline sends EVALSHA without checking the script
    first; after SCRIPT FLUSH (or a Redis restart) the writes it hit are
    redone, and the next batch runs on the reloaded script."""
    app = redis_app()
    store = result_store_for(app)

    def batch(n):
        ids = [new_id() for _ in range(n)]
        items = [WriteItem(*store._prepare(tid, i, states.SUCCESS, None, request_for(tid)))
                 for i, tid in enumerate(ids)]
        assert store._write_many(items) == [None] * n
        return [app.AsyncResult(tid).result for tid in ids]

    rdb.script_flush()
    assert batch(3) == [0, 1, 2]
    assert batch(2) == [0, 1]
    # SUCCESS stays sticky on the pipelined path too.
    tid = new_id()
    store._write_many([WriteItem(*store._prepare(tid, "first", states.SUCCESS, None,
                                                 request_for(tid)))])
    store._write_many([WriteItem(*store._prepare(tid, {"pid": 1}, states.STARTED, None,
                                                 request_for(tid)))])
    assert app.AsyncResult(tid).result == "first"


@pytest.fixture
def unacked():
    """kombu's ack keys for one fake message, in the broker's database (not
    the results'): the riding ack must SELECT it."""
    client = redis.Redis.from_url(harness.redis_db_url(harness.BROKER_DB))
    keys = (f"unacked.{new_id()}", f"unacked_index.{new_id()}")
    tag = new_id()
    client.hset(keys[0], tag, b"[{}, \"\", \"celery\"]")
    client.zadd(keys[1], {tag: time.time()})
    yield client, keys, tag
    client.delete(*keys)
    client.close()


@contextlib.contextmanager
def riding(store, keys, tag, early):
    """A run of ``store`` holding an ack ticket, group commit on."""
    group_commit.enable()
    try:
        store.ride(riding_acks.AckTicket(store._server, harness.BROKER_DB, keys[0], keys[1],
                                         tag, early))
        yield
    finally:
        riding_acks.begin(None)
        group_commit.disable()


@pytest.mark.parametrize("early", [False, True])
def test_an_ack_rides_with_the_success_write(rdb, unacked, early, monkeypatch):
    """Issue 19: where broker and results share a Redis server, a deferred
    SUCCESS and its message's ack are one script call (both or neither), for
    an acks_late task and for an early ack not sent yet."""
    # An early ack waits 2 ms for its SUCCESS, then goes alone (the next
    # test): under a loaded run the SUCCESS below can come later than that,
    # so this one holds the ack for as long as the test may take.
    monkeypatch.setattr(redis_backend, "EARLY_ACK_DELAY", 60.0)
    client, keys, tag = unacked
    app = redis_app()
    store = result_store_for(app)
    tid = new_id()
    with riding(store, keys, tag, early):
        store.mark_as_done(tid, 5, request_for(tid))
        write = group_commit.take()
    assert write is not None  # deferred, with the ack
    assert write.exception(timeout=5) is None
    assert app.AsyncResult(tid).result == 5
    assert client.hlen(keys[0]) == 0 and client.zcard(keys[1]) == 0


def test_a_sent_early_ack_makes_the_success_synchronous(rdb, unacked):
    """An early ack that went out alone (a task longer than the hold) leaves
    the SUCCESS nothing to ride with: it is written before the slot is free,
    so no acked message waits for a deferred result."""
    client, keys, tag = unacked
    app = redis_app()
    store = result_store_for(app)
    tid = new_id()
    with riding(store, keys, tag, early=True):
        riding_acks.current().write.exception(timeout=5)  # the ack went alone
        assert client.hlen(keys[0]) == 0
        store.mark_as_done(tid, 6, request_for(tid))
        assert group_commit.take() is None  # not deferred
    assert app.AsyncResult(tid).result == 6


def test_no_ack_rides_to_another_server(rdb, unacked):
    client, keys, tag = unacked
    store = result_store_for(redis_app())
    ticket = riding_acks.AckTicket(("elsewhere", 6379, None, None), harness.BROKER_DB,
                                   keys[0], keys[1], tag, True)
    store.ride(ticket)
    assert riding_acks.current() is None
    assert client.hlen(keys[0]) == 1


def test_sticky_check_reads_payloads_lua_cannot(rdb):
    # Another worker stored a compressed SUCCESS; our uncompressed JSON store
    # must still see it (Lua answers "undecided", Python decodes).
    writer = redis_app(result_compression="zlib")
    app = redis_app()
    tid = new_id()
    writer.backend.mark_as_done(tid, 1, request=request_for(tid))
    before = rdb.get(app.backend.get_key_for_task(tid))
    result_store_for(app).mark_as_failure(tid, ValueError("late"), "tb", request_for(tid))
    assert rdb.get(app.backend.get_key_for_task(tid)) == before
    # ... and a non-SUCCESS compressed state is overwritten as usual
    tid2 = new_id()
    writer.backend.mark_as_retry(tid2, ValueError("r"), "tb", request=request_for(tid2))
    result_store_for(app).mark_as_done(tid2, 7, request_for(tid2))
    assert app.AsyncResult(tid2).result == 7


def test_publish_makes_asyncresult_get_return_promptly(rdb):
    app = redis_app()
    client = redis_app()
    store = result_store_for(app)
    for state in ("done", "failure"):
        tid = new_id()
        res = client.AsyncResult(tid)

        def write(tid=tid, state=state):
            time.sleep(0.3)
            if state == "done":
                store.mark_as_done(tid, {"ok": True}, request_for(tid))
            else:
                store.mark_as_failure(tid, ValueError("boom"), "tb", request_for(tid))

        thread = threading.Thread(target=write)
        thread.start()
        started = time.monotonic()
        if state == "done":
            assert res.get(timeout=5) == {"ok": True}
        else:
            with pytest.raises(ValueError, match="boom"):
                res.get(timeout=5)
        elapsed = time.monotonic() - started
        thread.join()
        assert elapsed < 1.5, f"{state}: get() took {elapsed:.2f}s (no PUBLISH?)"


def test_publish_payload_equals_stored_payload(rdb):
    app = redis_app()
    store = result_store_for(app)
    tid = new_id()
    key = app.backend.get_key_for_task(tid)
    pubsub = redis.Redis.from_url(REDIS_URL).pubsub()
    pubsub.subscribe(key)
    pubsub.get_message(timeout=1)  # subscribe confirmation
    store.mark_as_done(tid, 5, request_for(tid))
    message = pubsub.get_message(timeout=2)
    pubsub.close()
    assert message["data"] == rdb.get(key)


def test_failure_side_effects_are_celerys(rdb, monkeypatch):
    app = redis_app()
    store = result_store_for(app)
    tid, next_id = new_id(), new_id()
    chained = {"task": "proj.next", "args": [], "kwargs": {}, "options": {"task_id": next_id},
               "subtask_type": None, "immutable": False}
    calls = []
    monkeypatch.setattr(app.backend, "on_chord_part_return",
                        lambda req, state, result: calls.append(("chord", state)))
    monkeypatch.setattr(app.backend, "_call_task_errbacks",
                        lambda req, exc, tb: calls.append(("errbacks", repr(exc))))
    request = request_for(tid, chain=[chained], chord={"task": "body"},
                          errbacks=[{"task": "proj.on_err"}])
    store.mark_as_failure(tid, ValueError("boom"), "tb", request)
    assert app.AsyncResult(tid).state == states.FAILURE
    # the rest of the chain reads as failed (Celery's _fail_chain, C23)
    assert app.AsyncResult(next_id).state == states.FAILURE
    assert calls == [("chord", states.FAILURE), ("errbacks", "ValueError('boom')")]
    calls.clear()
    store.mark_as_revoked(new_id(), "expired", request_for(new_id(), chord={"task": "b"}))
    assert calls == [("chord", states.REVOKED)]


def test_ignore_result_skips_the_write(rdb):
    app = redis_app()
    tid = new_id()
    result_store_for(app).mark_as_done(tid, 1, request_for(tid, ignore_result=True))
    assert rdb.get(app.backend.get_key_for_task(tid)) is None


def test_store_is_thread_safe(rdb):
    app = redis_app()
    store = result_store_for(app)
    ids = [new_id() for _ in range(200)]

    def work(chunk):
        for tid in chunk:
            store.mark_as_done(tid, tid, request_for(tid))

    threads = [threading.Thread(target=work, args=(ids[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    values = rdb.mget([app.backend.get_key_for_task(tid) for tid in ids])
    assert all(v is not None and tid.encode() in v for tid, v in zip(ids, values))


def test_selection_falls_back_to_the_adapter_for_custom_storage():
    from celery.backends.redis import RedisBackend

    class Custom(RedisBackend):
        def _set(self, key, value, expires=None):  # customised storage
            return super()._set(key, value, expires)

    class JustRenamed(RedisBackend):
        pass

    app = redis_app()
    assert isinstance(result_store_for(app, Custom(app=app, url=REDIS_URL)), AppBackendStore)
    assert isinstance(result_store_for(app, JustRenamed(app=app, url=REDIS_URL)),
                      RedisResultStore)
    cache_app = Celery("c", backend="cache+memory://", set_as_current=False)
    assert isinstance(result_store_for(cache_app), AppBackendStore)


def test_native_write_throughput_vs_celery(rdb, capsys):
    """Not a pass/fail benchmark: prints the per-store cost for the report."""
    app = redis_app()
    store = result_store_for(app)
    n = 2000
    timings = {}
    for name, target in (("celery", app.backend), ("ours", store)):
        ids = [new_id() for _ in range(n)]
        reqs = [request_for(tid) for tid in ids]
        started = time.perf_counter()
        for tid, req in zip(ids, reqs):
            target.mark_as_done(tid, {"v": 1}, request=req)
        timings[name] = (time.perf_counter() - started) / n * 1e6
    with capsys.disabled():
        print(f"\nmark_as_done on local Redis: celery {timings['celery']:.1f} us, "
              f"ours {timings['ours']:.1f} us")


# ------------------------------------------------------------------ RPC

#: RabbitMQ reachable, or the session ends (conftest's ``amqp_broker_url``).
needs_amqp = pytest.mark.usefixtures("amqp_broker_url")


def rpc_app(**conf) -> Celery:
    app = Celery("rpc-interop", backend="rpc://", broker=AMQP_URL, set_as_current=False)
    app.conf.update(accept_content=ALL_CONTENT, result_accept_content=ALL_CONTENT, **conf)
    return app


def declare_reply_queue(client: Celery, task_id: str) -> str:
    """What a client does before sending a task (RPCBackend.on_task_call)."""
    with client.producer_or_acquire() as producer:
        client.backend.on_task_call(producer, task_id)
    return client.backend.binding.name


def take_replies(app: Celery, queue: str) -> list:
    replies = []
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        while True:
            message = channel.basic_get(queue, no_ack=True)
            if message is None:
                return replies
            replies.append(message)


ISO_DATETIME = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d")


def masked_reply(message, task_id: str):
    body = message.body if isinstance(message.body, bytes) else message.body.encode("utf-8")
    body = body.replace(task_id.encode(), b"<TID>")
    body = ISO_DATETIME.sub(b"<DATE>", body)
    props = dict(message.properties)
    props.pop("application_headers", None)
    props["correlation_id"] = props["correlation_id"].replace(task_id, "<TID>")
    return body, props, message.headers


@needs_amqp
@pytest.mark.parametrize("conf", [{}, {"result_extended": True}, {"result_persistent": True},
                                  {"result_serializer": "msgpack"}])
def test_rpc_replies_match_celery(conf):
    client = rpc_app()
    worker = rpc_app(**conf)
    store = result_store_for(worker)
    assert isinstance(store, RPCResultStore)
    queue = declare_reply_queue(client, "any")
    take_replies(client, queue)
    ids = {"celery": new_id(), "ours": new_id()}
    for side, target in (("celery", worker.backend), ("ours", store)):
        tid = ids[side]
        req = request_for(tid, reply_to=queue)
        if side == "celery":
            target.store_result(tid, {"pid": 1, "hostname": "w@h"}, states.STARTED, request=req)
        else:
            target.mark_as_started(tid, {"pid": 1, "hostname": "w@h"}, req)
        target.mark_as_retry(tid, ValueError("again"), "tb", request=req)
        target.mark_as_failure(tid, ValueError("boom", 1), "tb", request=req)
        target.mark_as_done(tid, {"v": [1, "é"]}, request=req)
    replies = take_replies(client, queue)
    assert len(replies) == 8
    celery_replies = [m for m in replies if m.properties["correlation_id"] == ids["celery"]]
    our_replies = [m for m in replies if m.properties["correlation_id"] == ids["ours"]]
    assert len(celery_replies) == len(our_replies) == 4
    for theirs, ours in zip(celery_replies, our_replies):
        assert masked_reply(ours, ids["ours"]) == masked_reply(theirs, ids["celery"])
        assert ours.delivery_info["exchange"] == theirs.delivery_info["exchange"] == ""
    expected_mode = 2 if conf.get("result_persistent") else 1
    assert our_replies[0].properties["delivery_mode"] == expected_mode


@needs_amqp
def test_rpc_asyncresult_get_sees_our_reply():
    client = rpc_app()
    worker = rpc_app()
    store = result_store_for(worker)
    tid = new_id()
    queue = declare_reply_queue(client, tid)
    req = request_for(tid, reply_to=queue)

    def write():
        time.sleep(0.3)
        store.mark_as_started(tid, {"pid": 1, "hostname": "w@h"}, req)
        store.mark_as_done(tid, 99, req)

    thread = threading.Thread(target=write)
    thread.start()
    started = time.monotonic()
    assert client.AsyncResult(tid).get(timeout=5) == 99
    thread.join()
    assert time.monotonic() - started < 2


@needs_amqp
def test_rpc_no_reply_without_reply_to():
    client = rpc_app()
    worker = rpc_app()
    queue = declare_reply_queue(client, "x")
    take_replies(client, queue)
    tid = new_id()
    result_store_for(worker).mark_as_done(tid, 1, request_for(tid, reply_to=None))
    assert take_replies(client, queue) == []
    with pytest.raises(RuntimeError, match="RPC backend missing task request"):
        result_store_for(worker).mark_as_done(tid, 1, None)
