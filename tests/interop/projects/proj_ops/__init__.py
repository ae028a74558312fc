"""A Celery project for the operations tests (command lines, shutdown, bad input).

Laid out like ``proj_basic`` (``proj_ops/celery.py`` defines ``app``) and
configured from the same ``CC_TEST_*`` variables, so the harness can start
``celery -A proj_ops worker`` and ``ccworker -A proj_ops`` and build a client
for either. Its tasks are the ones operating a worker needs: one that reports
where it ran, one that sleeps while a signal arrives, one that counts how
often each message was executed.
"""

from .celery import app

__all__ = ("app",)
