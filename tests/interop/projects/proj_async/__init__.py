"""A Celery project whose tasks are ``async def`` (issue 17).

ccworker awaits them. A Celery worker cannot, so the differential tests run
``celery worker`` with ``CC_TEST_SYNC_TWINS=1``: every task is then
registered under the same name as its *synchronous twin*, the same body
driven without an event loop (``twins.py``), whose waits are real
``time.sleep`` calls where Celery's time limits land. What a client sees of
the two must be the same.
"""

from .celery import app

__all__ = ("app",)
