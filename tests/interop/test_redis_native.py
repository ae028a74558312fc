"""The native Redis path against kombu's, message for message, on a real Redis.

The worker-level differential tests (foundation, operations, rate limits,
leases...) already run ccworker on the native path; these pin down the
adapter itself: for the same published messages both adapters hand the
consumer identical deliveries and leave identical ``unacked`` state; the
batch never exceeds the free prefetch slots; priorities and poison payloads
are handled as kombu handles them; close and reject give messages back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

import pytest
import redis
from kombu import Connection, Exchange, Queue

import harness
from celerycompat.consumer.kombu_broker import KombuBroker
from celerycompat.consumer.redis_broker import RedisBroker

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


@pytest.fixture
def queue(redis_available):
    name = f"ccit.native.{harness.new_token()}"
    yield Queue(name, Exchange(name), routing_key=name,
                queue_arguments={"x-max-priority": 10})
    client = redis.Redis.from_url(_url())
    for key in client.scan_iter(match=f"{name}*"):
        client.delete(key)


def _url() -> str:
    return harness.redis_db_url(harness.BROKER_DB)


def _publish(queue: Queue, count: int, **options) -> None:
    with Connection(_url()) as conn:
        producer = conn.Producer()
        for index in range(count):
            producer.publish({"n": index}, exchange=queue.exchange, routing_key=queue.routing_key,
                             declare=[queue], headers={"task": "t", "id": f"id-{index}"},
                             **options)


def _consume(broker_class, queue: Queue, want: int, prefetch: int = 0):
    """Poll a fresh adapter until ``want`` deliveries came; return them and the adapter."""
    broker = broker_class(Connection(_url()))
    broker.connect()
    got = []
    broker.set_prefetch(prefetch)
    broker.consume([queue], got.append)
    for _ in range(50):
        if len(got) >= want:
            break
        broker.poll(0.1)
    return got, broker


def _unacked(tags) -> dict:
    client = redis.Redis.from_url(_url())
    return {tag: json.loads(client.hget("unacked", tag)) for tag in tags}


def _shape(delivery) -> tuple:
    return (delivery.body, delivery.content_type, delivery.content_encoding,
            delivery.headers, delivery.properties, delivery.delivery_info,
            delivery.decode_error)


@pytest.mark.parametrize("options", [{}, {"compression": "zlib"}, {"priority": 7}],
                         ids=["plain", "zlib", "priority"])
def test_same_deliveries_and_unacked_state_as_kombu(queue, options):
    """kombu takes the messages, requeues them; the native path takes them and
    requeues them; kombu takes them again. Both saw redelivered copies of the
    same messages (same tags): their deliveries and ``unacked`` entries match."""
    _publish(queue, 3, **options)
    first, kombu_broker = _consume(KombuBroker, queue, 3)
    for delivery in first:
        kombu_broker.reject(delivery, requeue=True)
    kombu_broker.close()

    native_got, native_broker = _consume(RedisBroker, queue, 3)
    native_state = _unacked(d.handle.delivery_tag for d in native_got)
    for delivery in native_got:
        native_broker.reject(delivery, requeue=True)
    native_broker.close()

    kombu_got, kombu_broker = _consume(KombuBroker, queue, 3)
    kombu_state = _unacked(d.handle.delivery_tag for d in kombu_got)
    assert sorted(map(_shape, native_got), key=repr) == sorted(map(_shape, kombu_got), key=repr)
    assert native_state == kombu_state
    for delivery in kombu_got:
        kombu_broker.reject(delivery, requeue=True)
    kombu_broker.close()

    native_got, native_broker = _consume(RedisBroker, queue, 3)
    for delivery in native_got:
        native_broker.ack(delivery)
    native_broker.poll(0)  # acks go out with the next poll
    client = redis.Redis.from_url(_url())
    tags = [d.handle.delivery_tag for d in native_got]
    assert not any(client.hexists("unacked", tag) for tag in tags)
    assert all(client.zscore("unacked_index", tag) is None for tag in tags)
    assert client.llen(queue.name) == 0
    native_broker.close()


def test_batch_bounded_by_free_prefetch_slots(queue):
    _publish(queue, 10)
    got, broker = _consume(RedisBroker, queue, 3, prefetch=3)
    for _ in range(5):
        broker.poll(0.05)
    assert len(got) == 3  # no room for more until one is settled
    broker.ack(got[0])
    broker.poll(0.05)
    assert len(got) == 4
    assert redis.Redis.from_url(_url()).llen(queue.name) == 6
    broker.close()


def test_a_busy_pool_fetches_and_acks_in_batches(queue):
    """While reserved tasks cover every free slot (demand 0), a fetch waits
    for half the prefetch window and the acks wait to ride with it (at most
    ACK_DELAY); a free slot with nothing for it fetches at once."""
    from celerycompat.consumer import redis_broker

    _publish(queue, 20)
    got, broker = _consume(RedisBroker, queue, 8, prefetch=8)
    client = redis.Redis.from_url(_url())
    assert len(got) == 8
    broker.set_demand(0)
    for delivery in got[:3]:
        broker.ack(delivery)
    broker.poll(0)
    assert len(got) == 8  # room 3: below half the window of 8
    assert client.hexists("unacked", got[0].handle.delivery_tag)  # riding later
    broker.ack(got[3])
    broker.poll(0)
    assert len(got) == 12  # room 4: one fetch of 4, the 4 acks with it
    assert not any(client.hexists("unacked", d.handle.delivery_tag) for d in got[:4])

    broker.ack(got[4])
    broker.poll(0)
    assert client.hexists("unacked", got[4].handle.delivery_tag)
    time.sleep(redis_broker.ACK_DELAY * 2)
    broker.poll(0)  # no fetch yet, but the ack has waited long enough
    assert not client.hexists("unacked", got[4].handle.delivery_tag)
    assert len(got) == 12

    broker.set_demand(1)  # a slot would go idle: fetch what room there is
    broker.ack(got[5])
    broker.poll(0)
    assert len(got) == 14
    broker.close()


def test_priority_order_as_kombu(queue):
    """On Redis, kombu consumes priority 0 first (its lowest step is its first key)."""
    _publish(queue, 1, priority=9)
    _publish(queue, 2, priority=0)
    got, broker = _consume(RedisBroker, queue, 3)
    assert [d.properties["priority"] for d in got] == [0, 0, 9]
    broker.close()


def test_close_and_requeue_give_messages_back(queue):
    _publish(queue, 4)
    got, broker = _consume(RedisBroker, queue, 4)
    broker.reject(got[0], requeue=True)
    broker.ack(got[1])
    broker.close()  # sends the ack, returns the two still held
    client = redis.Redis.from_url(_url())
    assert client.llen(queue.name) == 3
    assert not any(client.hexists("unacked", d.handle.delivery_tag) for d in got)


def test_poison_payloads_are_dropped_and_the_next_message_delivered(queue, caplog):
    client = redis.Redis.from_url(_url())
    _publish(queue, 1)
    client.lpush(queue.name, b"not json at all")
    client.lpush(queue.name, json.dumps({"body": "", "properties": {}}))
    _publish(queue, 1)
    with caplog.at_level(logging.CRITICAL):
        got, broker = _consume(RedisBroker, queue, 2)
    assert [d.headers["id"] for d in got] == ["id-0", "id-0"]
    assert caplog.text.count("Received and deleted a message") == 2
    assert client.hlen("unacked") >= 2
    broker.close()


def test_brpop_wakes_for_a_message_published_while_waiting(queue):
    got, broker = _consume(RedisBroker, queue, 0)
    broker.poll(0.05)  # nothing there: a BRPOP is now out
    _publish(queue, 1)
    for _ in range(20):
        broker.poll(0.1)
        if got:
            break
    assert [d.headers["id"] for d in got] == ["id-0"]
    assert redis.Redis.from_url(_url()).hexists("unacked", got[0].handle.delivery_tag)
    broker.cancel()
    _publish(queue, 1)
    broker.poll(0.2)
    assert len(got) == 1  # cancelled: nothing more is delivered
    broker.close()



def _signal_order(worker: harness.WorkerProcess, ids: list) -> list:
    """``(signal, index of the task in ids)`` as the worker's project recorded them."""
    records = redis.Redis.from_url(worker.broker.results_url)
    try:
        return [(name, ids.index(fields["id"]))
                for name, fields in map(json.loads, records.lrange(worker.record_key, 0, -1))
                if fields.get("id") in ids]
    finally:
        records.close()


def test_solo_receives_a_fetched_batch_one_task_at_a_time(redis_available, interop_log_dir):
    """Tasks queued before a solo worker starts come in one native fetch.
    Celery's solo pool runs each inside its delivery callback, so the next
    one is received (``task_received``) only after the one before ran; the
    signal order must be the same (CI once saw all three received first)."""
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    seen = {}
    for kind in harness.selected_kinds():
        worker = harness.WorkerProcess(kind, harness.WorkerSpec(), broker, interop_log_dir)
        try:
            with harness.client_app("proj_basic", worker.env) as app:
                ids = [app.tasks["proj_basic.tasks.add"].apply_async((n, n)).id
                       for n in range(3)]
                worker.start()
                harness.wait_until(lambda w=worker, i=ids: sum(
                    name == "task_postrun" for name, _ in _signal_order(w, i)) == 3, 30)
                seen[kind] = _signal_order(worker, ids)
        finally:
            worker.stop()
            broker.forget_queue(worker.token, worker.queue)
            with contextlib.suppress(Exception):
                redis.Redis.from_url(broker.results_url).delete(worker.record_key)
    assert seen[harness.selected_kinds()[0]][:3] == [
        ("task_received", 0), ("task_prerun", 0), ("task_success", 0)], seen
    harness.assert_same_across_kinds(seen)
