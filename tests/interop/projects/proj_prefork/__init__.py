"""A Celery project for the prefork pool scenarios: children that die, time
limits, recycling, and the per-process signals.

Configured from the same ``CC_TEST_*`` variables as ``proj_basic`` (see
there), so ``celery -A proj_prefork worker`` and ``ccworker -A proj_prefork``
run the very same code.
"""

from .celery import app

__all__ = ("app",)
