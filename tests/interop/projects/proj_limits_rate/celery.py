"""The Celery app of ``proj_limits_rate``, configured from ``CC_TEST_*`` variables.

``CC_TEST_BROKER``, ``CC_TEST_BACKEND``, ``CC_TEST_QUEUE``,
``CC_TEST_RECORD_URL`` and ``CC_TEST_RECORD`` mean what they mean for
``proj_basic`` (see its ``celery.py``). ``CC_TEST_DISABLE_RATE_LIMITS=1``
sets ``worker_disable_rate_limits``. One task gets its rate limit only from
``task_annotations``, the way a deployment limits tasks it does not own.
"""

import os

from celery import Celery, signals

from ccit_recorder import record

app = Celery("proj_limits_rate", include=["proj_limits_rate.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    task_annotations={"proj_limits_rate.tasks.annotated": {"rate_limit": "2/s"}},
    worker_disable_rate_limits=os.environ.get("CC_TEST_DISABLE_RATE_LIMITS", "") == "1",
)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    # The harness waits for this record before it calls a worker ready.
    record("worker_ready", hostname=getattr(sender, "hostname", None))
