"""The Celery app of ``proj_stamps``, configured from ``CC_TEST_*`` variables.

``CC_TEST_BROKER``, ``CC_TEST_BACKEND``, ``CC_TEST_QUEUE``,
``CC_TEST_RECORD_URL`` and ``CC_TEST_RECORD`` mean what they mean for
``proj_basic``. Signal receivers record what a project can see of a task
revoked by stamp: received, revoked (with ``terminated``/``expired``).
"""

import os

from celery import Celery, signals

from ccit_recorder import record

app = Celery("proj_stamps", include=["proj_stamps.tasks"])
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


@signals.task_received.connect
def on_task_received(sender=None, request=None, **kwargs):
    record("task_received", id=getattr(request, "id", None))


@signals.task_revoked.connect
def on_task_revoked(sender=None, request=None, terminated=None, signum=None, expired=None,
                    **kwargs):
    record("task_revoked", id=getattr(request, "id", None), terminated=terminated,
           signum=signum, expired=expired,
           stamps=getattr(request, "stamps", None))
