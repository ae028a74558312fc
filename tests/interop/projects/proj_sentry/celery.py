"""The app of ``proj_sentry``, configured from ``CC_TEST_*`` variables (see ``proj_ops``)."""

import os

import sentry_sdk
from celery import Celery, signals
from sentry_sdk.integrations.celery import CeleryIntegration

from ccit_recorder import record

sentry_sdk.init(
    dsn=os.environ.get("CC_TEST_SENTRY_DSN"),
    integrations=[CeleryIntegration()],
    traces_sample_rate=1.0,
    # The same in both workers' events (the host name is normalised anyway).
    release="proj_sentry@1",
    environment="interop",
)

app = Celery("proj_sentry", include=["proj_sentry.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    record("worker_ready", hostname=getattr(sender, "hostname", None))
