"""A project whose default queue is a RabbitMQ quorum queue (``task_default_queue_type``).

RabbitMQ refuses global QoS on quorum queues, so a worker must ask for
per-consumer QoS (Celery: ``worker_detect_quorum_queues``). ``CC_TEST_*``
variables mean what they mean for ``proj_basic``.
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
    broker_connection_retry_on_startup=True,
)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    record("worker_ready", hostname=getattr(sender, "hostname", None))
