"""The Celery app, as in Celery's "First steps with Django", plus recording receivers.

Database-connection probes: Celery's Django fixup closes the connections of
the task's thread in ``task_prerun`` and ``task_postrun`` (it connects its
receivers at ``worker_init``). ``open_before_fixup`` is connected here, at
import, so it runs *before* the fixup's ``task_prerun`` receiver and opens a
connection the fixup should close; ``check_after_fixup`` is connected in
``worker_init``, after the fixup's own ``worker_init`` receiver, so it runs
*after* the fixup's ``task_postrun`` receiver and sees whether it closed the
connection the task used.
"""

import os

from celery import Celery, signals

from ccit_recorder import record

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproj_extras.settings")

app = Celery("djproj_extras")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

PROBE_TASK = "djproj_extras.probes.tasks.db_probe"


def _connection_open():
    from django.db import connection

    return connection.connection is not None


@signals.task_prerun.connect
def open_before_fixup(sender=None, task_id=None, **kwargs):
    if getattr(sender, "name", None) != PROBE_TASK:
        return
    from django.db import connection

    connection.ensure_connection()
    record("prerun_opened", task_id=task_id, open=_connection_open())


def check_after_fixup(sender=None, task_id=None, **kwargs):
    if getattr(sender, "name", None) != PROBE_TASK:
        return
    record("postrun_after_fixup", task_id=task_id, open=_connection_open())


@signals.worker_init.connect
def on_worker_init(sender=None, **kwargs):
    signals.task_postrun.connect(check_after_fixup)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    # The interop harness waits for this record before calling a worker ready.
    record("worker_ready", hostname=getattr(sender, "hostname", None), pid=os.getpid())


@signals.beat_init.connect
def on_beat_init(sender=None, **kwargs):
    record("beat_init", pid=os.getpid(), scheduler=type(sender.scheduler).__name__)


@signals.beat_embedded_init.connect
def on_beat_embedded_init(sender=None, **kwargs):
    record("beat_embedded_init", pid=os.getpid())
