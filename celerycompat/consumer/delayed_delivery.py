"""Native delayed delivery on RabbitMQ quorum queues (Celery >= 5.5).

RabbitMQ's quorum queues cannot hold a message back, so from 5.5 a Celery
client sends a countdown/ETA task bound for a quorum queue on a topic or
fanout exchange through a ladder of ``celery_delayed_<level>`` exchanges and
dead-lettering queues (kombu's ``native_delayed_delivery``): the message
waits in the broker, not in a worker's memory. The exchanges and queues are
declared, and the application's queues bound to them, by the worker's
``DelayedDelivery`` consumer step. Without it a cluster of only ccworkers
made those clients fail (``NOT_FOUND - no exchange 'celery_delayed_27'``),
or, with exchanges left by an earlier Celery worker, dropped delayed tasks
for queues declared since.

ccworker runs the installed Celery's own step, so what it declares, binds,
retries and logs (kombu's warning for a direct exchange included) is that
release's: `include_if` once at start, `start` at every connection, after
consuming has begun and before the first message is handled, as Celery's
consumer blueprint orders it (the step requires ``Tasks``). Releases before
5.5 have no such step, and neither does ccworker under them.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any, Optional

logger = logging.getLogger("celery.worker.consumer.delayed_delivery")


class NativeDelayedDelivery:
    """Celery's ``DelayedDelivery`` step as a consumer observer (``connected``)."""

    def __init__(self, step: Any, parent: Any) -> None:
        self.step = step
        self.parent = parent

    def connected(self, broker: Any) -> None:
        """Declare and bind on the connection just made (blocks, as in Celery)."""
        self.step.start(self.parent)


def _driver_type(app: Any) -> Optional[str]:
    """The broker's transport driver (``amqp``, ``redis``...) from the app's
    settings alone: no kombu ``Connection`` or transport object is made."""
    from kombu.transport import resolve_transport

    url = app.conf.broker_write_url or app.conf.broker_url or ""
    if isinstance(url, (list, tuple)):
        url = url[0] if url else ""
    url = str(url).split(";", 1)[0]
    name = app.conf.broker_transport or (url.split("://", 1)[0] if "://" in url else url)
    try:
        return getattr(resolve_transport(name or "amqp"), "driver_type", None)
    except Exception:  # a transport whose client library is not installed
        return None


def native_delayed_delivery(app: Any) -> Optional[NativeDelayedDelivery]:
    """The step for ``app``, or None: Celery < 5.5, not RabbitMQ, or no quorum
    queue in use.

    The step's own ``include_if`` builds a kombu connection and transport
    to read the driver type. With that extra Redis transport built, the
    Celery 5.5.3 matrix's solo worker stalled in its poll with a retry's
    countdown held (the task never ran, the liveness watchdog broke the
    connection after 30 s); without it the same runs pass. The mechanism is
    not pinned down; Celery's answer is "no" for every broker but RabbitMQ,
    so the driver is read from the settings and nothing is built there.
    """
    if _driver_type(app) != "amqp":
        return None
    try:
        from celery.worker.consumer.delayed_delivery import DelayedDelivery
    except ImportError:
        return None
    parent = SimpleNamespace(app=app)  # all the step reads of Celery's consumer
    step = DelayedDelivery(parent)
    if not step.include_if(parent):
        return None
    return NativeDelayedDelivery(step, parent)
