"""A project whose tasks have their own ``Request`` class (Celery docs:
"Requests and custom requests").

Run by ``celery -A proj_requests worker`` and ``ccworker -A proj_requests``
alike (tests/interop/test_project_requests.py); ``CC_TEST_*`` variables mean
what they mean for ``proj_basic``.
"""

from .celery import app

__all__ = ("app",)
