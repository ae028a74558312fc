"""The Celery app of ``proj_async`` (settings as ``proj_basic``'s)."""

import os

from celery import Celery

app = Celery("proj_async", include=["proj_async.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
)

from . import signals  # noqa: E402,F401
