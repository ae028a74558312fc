"""The app of ``proj_canvas``: retries, Reject, replace, canvas and built-ins.

``CC_TEST_*`` variables mean what they mean for ``proj_basic``. The extra
queue ``<queue>.side`` is where ``retry_to_side`` sends its retry, so a
test can read the message a worker published, byte for byte, instead of
letting a worker consume it.
"""

import os

from celery import Celery, signals

from ccit_recorder import record

QUEUE = os.environ.get("CC_TEST_QUEUE", "celery")
SIDE = QUEUE + ".side"

app = Celery("proj_canvas", include=["proj_canvas.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    record("worker_ready", hostname=getattr(sender, "hostname", None))
