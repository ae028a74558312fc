"""A project whose default queue is a RabbitMQ quorum queue (``task_default_queue_type``).

RabbitMQ refuses global QoS on quorum queues, so a worker must ask for
per-consumer QoS (Celery: ``worker_detect_quorum_queues``). ``CC_TEST_*``
variables mean what they mean for ``proj_basic``; ``CC_TEST_EXCHANGE_TYPE``
sets the default exchange's type (``direct`` unless given).
"""

import os

from celery import Celery, signals

from ccit_recorder import record

app = Celery("proj_quorum", include=["proj_quorum.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    task_default_queue_type="quorum",
    # ``topic`` for native delayed delivery (test_delayed_delivery.py): a
    # Celery >= 5.5 client sends countdown tasks through the celery_delayed_*
    # exchanges only for topic/fanout exchanges; Celery's default is direct.
    task_default_exchange_type=os.environ.get("CC_TEST_EXCHANGE_TYPE", "direct"),
    broker_connection_retry_on_startup=True,
)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    record("worker_ready", hostname=getattr(sender, "hostname", None))
