"""A project for ``-P eventlet`` (tests/interop/test_eventlet.py); ``CC_TEST_*``
variables mean what they mean for ``proj_basic``."""

from .celery import app

__all__ = ("app",)
