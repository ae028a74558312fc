"""The AMQP adapter (consumer/kombu_broker.py) against a real RabbitMQ.

py-amqp hands out one frame set per ``drain_events`` call, so a poll that
read one message per call sent the consumer round its whole loop for each
one. A poll now also reads what has already arrived, bounded by
``AMQP_BURST``.
"""

from __future__ import annotations

import json
import time

import pytest
from kombu import Connection, Exchange, Queue

import harness
from celerycompat.consumer import kombu_broker
from celerycompat.consumer.kombu_broker import KombuBroker

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


@pytest.fixture
def amqp_queue(amqp_broker_url):
    url = amqp_broker_url[0]
    name = f"ccit.burst.{harness.new_token()}"
    queue = Queue(name, Exchange(name), routing_key=name, auto_delete=True)
    yield url, queue
    with Connection(url) as conn:
        try:
            queue.bind(conn.default_channel).delete()
        except Exception:
            pass


def test_one_poll_reads_every_message_already_arrived(amqp_queue):
    url, queue = amqp_queue
    total = kombu_broker.AMQP_BURST + 10
    with Connection(url) as conn:
        producer = conn.Producer()
        queue.bind(conn.default_channel).declare()
        for index in range(total):
            producer.publish({"n": index}, exchange=queue.exchange,
                             routing_key=queue.routing_key,
                             headers={"task": "t", "id": f"id-{index}"})
    broker = KombuBroker(Connection(url))
    broker.connect()
    got: list = []
    try:
        broker.set_prefetch(100)
        broker.consume([queue], got.append)
        broker.limit_fetch(None)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            broker.poll(0.2)
        first = len(got)
        time.sleep(0.5)  # the rest of the QoS window reaches the socket
        broker.poll(0.2)
        # The first poll may have met a half-filled socket; the second one
        # had everything waiting and reads up to the burst past the first
        # (one message per poll before: 2 in all).
        assert len(got) == min(total, first + kombu_broker.AMQP_BURST + 1), (first, len(got))
        assert [json.loads(d.body)["n"] for d in got] == list(range(len(got)))
    finally:
        broker.close()
