"""When the worker runs Celery's DelayedDelivery step (the wire side is
tests/interop/test_delayed_delivery.py)."""

from __future__ import annotations

import uuid

from celery import Celery

from celerycompat.consumer.delayed_delivery import NativeDelayedDelivery, native_delayed_delivery


def app(broker: str, queue_type: str | None = None) -> Celery:
    made = Celery(f"t{uuid.uuid4().hex[:6]}", broker=broker, set_as_current=False)
    if queue_type:
        made.conf.task_default_queue_type = queue_type
    return made


def test_included_only_for_quorum_queues_on_rabbitmq():
    amqp = "amqp://guest:guest@127.0.0.1:5672//"
    found = native_delayed_delivery(app(amqp, "quorum"))
    assert isinstance(found, NativeDelayedDelivery)
    assert callable(found.connected)  # the observer hook it runs at each connection
    assert native_delayed_delivery(app(amqp)) is None  # classic queues
    assert native_delayed_delivery(app("redis://127.0.0.1:6379/0", "quorum")) is None


def test_the_driver_is_read_from_the_settings():
    from celerycompat.consumer.delayed_delivery import _driver_type

    assert _driver_type(app("redis://127.0.0.1:6379/0")) == "redis"
    assert _driver_type(app("pyamqp://guest@127.0.0.1//;amqp://other//")) == "amqp"
    listed = app("memory://")
    listed.conf.broker_url = ["amqp://a//", "amqp://b//"]
    assert _driver_type(listed) == "amqp"
    overridden = app("redis://127.0.0.1:6379/0")
    overridden.conf.broker_transport = "amqp"
    assert _driver_type(overridden) == "amqp"
