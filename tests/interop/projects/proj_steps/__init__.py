"""A project with its own bootsteps (the Celery docs' "Extensions and Bootsteps").

Run by ``celery -A proj_steps worker`` and ``ccworker -A proj_steps`` alike
(tests/interop/test_bootsteps.py); ``CC_TEST_*`` variables mean what they
mean for ``proj_basic``.
"""

from .celery import app

__all__ = ("app",)
