"""A plain Celery project, as users write them, for the differential tests.

Everything that varies per test run (broker, result backend, queue name,
the Redis list hooks and signals record to, ``result_extended``) is read
from ``CC_TEST_*`` environment variables, so the very same project is run
by ``celery -A proj_basic worker`` and by ``ccworker -A proj_basic``, and
imported by the test process to build the client app.

The package layout (``proj_basic/celery.py`` defining ``app``) is the one
``celery -A proj_basic`` resolves by looking for a ``celery`` submodule, the
layout the Celery docs recommend, so ccworker's ``-A`` resolution is
exercised the same way.
"""

from .celery import app

__all__ = ("app",)
