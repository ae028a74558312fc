"""The Celery app of ``proj_ops``, configured from ``CC_TEST_*`` variables.

``CC_TEST_BROKER``, ``CC_TEST_BACKEND``, ``CC_TEST_QUEUE``,
``CC_TEST_RECORD_URL`` and ``CC_TEST_RECORD`` mean what they mean for
``proj_basic`` (see its ``celery.py``). Nothing else is configured, so every
other setting is Celery's default, which is what the command line overrides.
"""

import os

from celery import Celery, signals

from ccit_recorder import record

app = Celery("proj_ops", include=["proj_ops.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    # The harness waits for this record before it calls a worker ready.
    record("worker_ready", hostname=getattr(sender, "hostname", None))


@signals.worker_shutting_down.connect
def on_worker_shutting_down(sig=None, how=None, exitcode=None, **kwargs):
    record("worker_shutting_down", sig=sig, how=how, exitcode=exitcode)
