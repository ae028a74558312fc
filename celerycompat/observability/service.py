"""`Observability`: the metrics sink the consumer feeds and the endpoint serving it."""

from __future__ import annotations

import logging
from typing import Any, Optional

from celerycompat.observability.server import MetricsServer
from celerycompat.observability.settings import ObservabilitySettings
from celerycompat.observability.worker_metrics import WorkerMetrics

logger = logging.getLogger("celerycompat.observability")


class Observability:
    """What ``--metrics-port`` adds to a worker; the worker calls these in order:
    `start` (before the pool: a taken port stops the start early), `watch`
    (once the consumer exists), `ready` (with ``worker_ready``), `stop`."""

    def __init__(self, settings: ObservabilitySettings, info: dict[str, str]) -> None:
        self.settings = settings
        self.metrics = WorkerMetrics(info=info, stall_timeout=settings.stall_timeout)
        self.server = MetricsServer(self.metrics, settings.metrics_host,
                                    int(settings.metrics_port or 0))

    def start(self) -> tuple[str, int]:
        """Bind and serve; OSError when the address cannot be bound."""
        host, port = self.server.start()
        shown = f"[{host}]" if ":" in host else host
        logger.info("Metrics on http://%s:%s/metrics, probes on /healthz and /readyz",
                    shown, port)
        return host, port

    def watch(self, consumer: Any) -> None:
        self.metrics.watch(consumer)

    def ready(self) -> None:
        self.metrics.ready()

    def stop(self) -> None:
        self.server.stop()


def observability_for(options: Any) -> Optional[Observability]:
    """The worker's `Observability`, or None without ``--metrics-port``."""
    settings = getattr(options, "observability", None)
    if settings is None or settings.metrics_port is None:
        return None
    from celery import __version__ as celery_version

    from celerycompat import __version__

    info = {"version": __version__, "celery_version": celery_version,
            "nodename": options.nodename, "pool": options.pool}
    return Observability(settings, info)
