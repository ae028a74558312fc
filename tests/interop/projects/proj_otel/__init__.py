"""A project traced with OpenTelemetry's Celery instrumentation.

Set up as the instrumentation's documentation says: the tracer provider and
``CeleryInstrumentor().instrument()`` in ``worker_process_init`` (so in every
pool process). Spans are exported synchronously, each one RPUSHed as JSON to
the worker's record list (``ccit_recorder``), where the interop test reads
what the worker process produced.
"""

from .celery import app

__all__ = ("app",)
