"""A Celery project for the time-limit scenarios on every pool.

Configured from the same ``CC_TEST_*`` variables as ``proj_basic`` (see
there), so ``celery -A proj_timelimits worker`` and ``ccworker -A
proj_timelimits`` run the very same code.
"""

from .celery import app

__all__ = ("app",)
