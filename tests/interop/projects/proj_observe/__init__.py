"""A project for the observability tests: outcomes of every kind, and a stall.

Configured from the ``CC_TEST_*`` variables like ``proj_basic``.
"""

from .celery import app

__all__ = ("app",)
