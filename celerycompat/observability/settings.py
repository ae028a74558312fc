"""The ccworker-only flags of observability, as `WorkerOptions` carries them.

They have no ``celery worker`` counterpart, so the command line keeps them
out of the keyword set ``celeryd_init`` receivers see (which must stay
Celery's) and hands them over in one `ObservabilitySettings`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_STALL_TIMEOUT = 60.0
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class ObservabilitySettings:
    metrics_port: Optional[int] = None
    """``--metrics-port``: serve the endpoint on this port (0: any free one);
    None: no endpoint."""
    metrics_host: str = DEFAULT_METRICS_HOST
    """``--metrics-host``: the address to bind; loopback unless told otherwise."""
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    """``--health-stall-timeout``: seconds without a consumer loop turn before
    ``/healthz`` fails (health.py has the rule)."""
    log_format: str = "text"
    """``--log-format``: ``text`` (Celery's format) or ``json``."""
