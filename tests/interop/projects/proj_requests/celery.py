"""The app: every task of ``proj_requests.tasks`` uses `requests.TrackedRequest`."""

import os

from celery import Celery

app = Celery("proj_requests", include=["proj_requests.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
)
