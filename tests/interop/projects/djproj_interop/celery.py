"""The Celery app, as in Celery's "First steps with Django"."""

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproj_interop.settings")

app = Celery("djproj_interop")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    # The interop harness waits for this record before calling a worker ready.
    from ccit_recorder import record

    record("worker_ready", hostname=getattr(sender, "hostname", None))
