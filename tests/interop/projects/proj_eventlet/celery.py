"""The Celery app of ``proj_eventlet`` (settings as ``proj_basic``'s), and
receivers of Celery's eventlet pool signals, recorded in order."""

import os

from celery import Celery, signals

from ccit_recorder import record

app = Celery("proj_eventlet", include=["proj_eventlet.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
)


@signals.eventlet_pool_started.connect
def on_started(sender=None, **kwargs):
    record("eventlet_pool_started", limit=getattr(sender, "limit", None))


@signals.eventlet_pool_apply.connect
def on_apply(sender=None, target=None, **kwargs):
    record("eventlet_pool_apply", limit=getattr(sender, "limit", None),
           target=callable(target))


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    record("worker_ready")
