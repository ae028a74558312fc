"""The app of ``proj_migrate``: one task that counts its runs per task id.

``CC_TEST_*`` variables mean what they mean for ``proj_basic``.
"""

import os

from celery import Celery, signals

from ccit_recorder import record

app = Celery("proj_migrate", include=["proj_migrate.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    record("worker_ready", hostname=getattr(sender, "hostname", None))
