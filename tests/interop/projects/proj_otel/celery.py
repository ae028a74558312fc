"""The app of ``proj_otel``, configured from ``CC_TEST_*`` variables (see ``proj_ops``)."""

import os

from celery import Celery, signals
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from ccit_recorder import record

app = Celery("proj_otel", include=["proj_otel.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
)


def _hex(value, width):
    return None if value is None else format(value, f"0{width}x")


class RecordingExporter(SpanExporter):
    """Every finished span, as plain JSON, to the worker's record list."""

    def export(self, spans):
        for span in spans:
            record(
                "span",
                name=span.name,
                kind=span.kind.name,
                trace_id=_hex(span.context.trace_id, 32),
                span_id=_hex(span.context.span_id, 16),
                parent_id=_hex(span.parent.span_id, 16) if span.parent else None,
                status=span.status.status_code.name,
                attributes=dict(span.attributes or {}),
                events=[{"name": e.name, "attributes": dict(e.attributes or {})}
                        for e in span.events],
            )
        return SpanExportResult.SUCCESS

    def shutdown(self):
        pass


@signals.worker_process_init.connect(weak=False)
def init_tracing(**kwargs):
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(RecordingExporter()))
    CeleryInstrumentor().instrument(tracer_provider=provider)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    record("worker_ready", hostname=getattr(sender, "hostname", None))
