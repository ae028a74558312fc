"""A Celery project for the pool-control scenarios: terminating running
tasks (``revoke(terminate=True)``), ``pool_grow``/``pool_shrink``,
``pool_restart`` and ``--autoscale``.

Configured from the same ``CC_TEST_*`` variables as ``proj_basic`` (see
there), so ``celery -A proj_pool worker`` and ``ccworker -A proj_pool`` run
the very same code. ``CC_TEST_POOL_RESTARTS=1`` turns on
``worker_pool_restarts``.
"""

from .celery import app

__all__ = ("app",)
