"""The app of ``proj_beat``, configured from ``CC_TEST_*`` variables (see ``proj_ops``)."""

import os

from celery import Celery, signals

from ccit_recorder import record

app = Celery("proj_beat", include=["proj_beat.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    beat_schedule={
        "tick-every-second": {"task": "proj_beat.tasks.tick", "schedule": 1.0},
    },
)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    record("worker_ready", hostname=getattr(sender, "hostname", None), pid=os.getpid())


@signals.beat_init.connect
def on_beat_init(sender=None, **kwargs):
    record("beat_init", pid=os.getpid(), scheduler=type(sender.scheduler).__name__)


@signals.beat_embedded_init.connect
def on_beat_embedded_init(sender=None, **kwargs):
    record("beat_embedded_init", pid=os.getpid())
