"""A Celery project exercising what travels on the wire, for the differential tests.

``celery -A proj_wire worker`` and ``ccworker -A proj_wire`` run this very
package, and the test process imports it to build its client app, so the
worker and the client are configured by the same code (see ``celery.py``
for the environment variables that select a variant).
"""

from .celery import app

__all__ = ("app",)
