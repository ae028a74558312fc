"""Tasks of the ``probes`` app: ``shared_task``s, as Django projects write them."""

import time

from celery import shared_task
from django.db import connection

from ccit_recorder import record


@shared_task
def tick():
    """The periodic task of ``CELERY_BEAT_SCHEDULE``."""
    record("tick", at=time.time())


@shared_task
def add(x, y):
    return x + y


@shared_task
def fail(message):
    raise ValueError(message)


@shared_task(bind=True)
def db_probe(self):
    """Whether the connection opened before the fixup's ``task_prerun`` was
    closed when the body starts; then use the database (opens one again)."""
    closed_at_start = connection.connection is None
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        one = cursor.fetchone()[0]
    record("body", task_id=self.request.id, closed_at_start=closed_at_start,
           open_after_query=connection.connection is not None)
    return one
