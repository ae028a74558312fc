"""A project on Redis with a short ``visibility_timeout`` (``CC_TEST_VT`` seconds).

Every consumer restores un-acked messages scored older than the timeout,
checking every second (``unacked_restore_interval=1``, throttle 1), so a
worker that holds a message longer than that without refreshing its lease
sees it run again elsewhere. ``CC_TEST_*`` variables mean what they mean for
``proj_basic``.
"""

import os

from celery import Celery, signals

from ccit_recorder import record

app = Celery("proj_lease", include=["proj_lease.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("CC_TEST_VT", "3")),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    record("worker_ready", hostname=getattr(sender, "hostname", None))
