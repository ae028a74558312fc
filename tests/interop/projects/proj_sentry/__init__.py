"""A project reporting to Sentry through sentry-sdk's Celery integration.

``sentry_sdk.init`` runs when the app module is imported (Sentry's Celery
guide), with the DSN from ``CC_TEST_SENTRY_DSN``: the interop test points it
at a tiny HTTP server of its own that records the envelopes it receives.
Tracing is on, so the task transactions the integration opens around every
run are sent too.
"""

from .celery import app

__all__ = ("app",)
