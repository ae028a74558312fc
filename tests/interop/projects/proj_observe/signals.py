"""A ``task_received`` receiver that blocks: a stalled consumer, as a slow hook makes one.

``task_received`` runs on the worker's consumer thread (in Celery and in
ccworker), so while it sleeps no message is fetched, acked or settled.
"""

import time

from celery import signals


@signals.task_received.connect
def block_the_consumer(sender=None, request=None, **kwargs):
    if getattr(request, "name", None) == "proj_observe.tasks.stall_on_receipt":
        time.sleep(float(request.args[0]))
