"""The worker's pidbox node: ``<nodename>.celery.pidbox`` (wire contract F1-F7).

The queue, exchanges, destination/pattern matching, clock handling and reply
publishing are kombu's ``pidbox.Node`` configured by the app's own
``app.control.mailbox`` (so ``control_exchange``, the queue TTLs and the
serializer are the project's), exactly what ``celery inspect``/``control`` and
Flower talk to. Messages are handled on the consumer thread, between task
deliveries, so replies never wait behind running tasks. Junk never escapes:
a malformed request is logged and dropped, the worker keeps serving.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from celery.exceptions import WorkerShutdown

from celerycompat.control.commands import handlers_for

logger = logging.getLogger("celery.worker.pidbox")


class ControlMailbox:
    """Listens on the node queue of one worker; rebuilt on every (re)connection."""

    def __init__(self, app: Any, hostname: str, state: Any,
                 on_shutdown: Callable[[], None]) -> None:
        self.app = app
        self.hostname = hostname
        self.node = app.control.mailbox.Node(hostname, handlers=handlers_for(), state=state)
        self._on_shutdown = on_shutdown
        self._consumer: Any = None

    def start(self, connection: Any) -> None:
        self.node.channel = connection.channel()
        self._consumer = self.node.listen(callback=self.on_message)

    def on_message(self, body: Any, message: Any) -> None:
        self.app.clock.forward()
        try:
            if not isinstance(body, dict):
                raise TypeError(f"control message body is not a mapping: {body!r:.200}")
            self.node.handle_message(body, message)
        except WorkerShutdown:
            # The shutdown command: no reply, a warm shutdown (G8, F6).
            self._on_shutdown()
        except Exception as exc:
            logger.error("Control command error: %r", exc, exc_info=True)

    def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        channel = self.node.channel
        self.node.channel = None
        for close in (getattr(consumer, "cancel", None), getattr(channel, "close", None)):
            if close is None:
                continue
            try:
                close()
            except Exception:
                logger.debug("closing the pidbox consumer failed", exc_info=True)
