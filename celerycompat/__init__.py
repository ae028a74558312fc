"""celerycompat: a drop-in replacement for the Celery worker.

Run ``ccworker -A proj`` where you ran ``celery -A proj worker``. The wire
(task messages, results, events, the pidbox mailbox) is Celery's; the worker
behind it is ours.
"""

__version__ = "0.1.0"
