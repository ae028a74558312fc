"""A Celery project for the rate-limit tests (``Task.rate_limit``, annotations).

Laid out like ``proj_ops`` (``proj_limits_rate/celery.py`` defines ``app``)
and configured from the same ``CC_TEST_*`` variables, plus
``CC_TEST_DISABLE_RATE_LIMITS=1`` for ``worker_disable_rate_limits``.
"""

from .celery import app

__all__ = ("app",)
