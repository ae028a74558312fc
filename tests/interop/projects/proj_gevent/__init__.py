"""A Celery project for the gevent pool scenarios: many sleeping tasks,
time limits, and tasks that block the event loop.

Configured from the same ``CC_TEST_*`` variables as ``proj_basic`` (see
there), so ``celery -A proj_gevent worker -P gevent`` and ``ccworker -A
proj_gevent -P gevent`` run the very same code.
"""

from .celery import app

__all__ = ("app",)
