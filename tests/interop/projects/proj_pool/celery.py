"""The Celery app of ``proj_pool`` and the signals its tests observe."""

import os

from celery import Celery, signals

from ccit_recorder import record

app = Celery("proj_pool", include=["proj_pool.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    worker_pool_restarts=os.environ.get("CC_TEST_POOL_RESTARTS", "") == "1",
    broker_connection_retry_on_startup=True,
)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    # The harness waits for this record before it calls a worker ready.
    record("worker_ready", hostname=getattr(sender, "hostname", None))


@signals.task_revoked.connect
def on_task_revoked(sender=None, request=None, terminated=None, signum=None, expired=None,
                    **kwargs):
    record("task_revoked", id=getattr(request, "id", None), name=getattr(sender, "name", None),
           terminated=terminated, signum=signum, expired=expired)


@signals.task_failure.connect
def on_task_failure(sender=None, task_id=None, exception=None, **kwargs):
    record("task_failure", id=task_id, exception=f"{type(exception).__name__}")


@signals.task_success.connect
def on_task_success(sender=None, result=None, **kwargs):
    record("task_success", id=sender.request.id)
