"""Mingle: at every (re)connection, sync revoked ids and the clock with peers (G4).

Celery's worker broadcasts ``hello`` and blocks consumption for the reply
timeout (1 s). Here the request runs on a thread of its own (with its own
connection, which it publishes and collects on) while the consumer
already serves its mailbox and receives messages; only *starting* tasks
waits until the replies are merged, so a task revoked on a peer is still
never run here.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

logger = logging.getLogger("celery.worker.consumer.mingle")

#: Transports Celery runs mingle on.
COMPATIBLE_TRANSPORTS = frozenset({"amqp", "redis", "gcpubsub"})


class Mingle:
    def __init__(self, app: Any, hostname: str, revoked: Any, *, timeout: float = 1.0) -> None:
        self.app = app
        self.hostname = hostname
        self.revoked = revoked
        self.timeout = timeout
        self.done = True
        self._replies: dict[str, Any] | None = None
        self._thread: threading.Thread | None = None

    def begin(self) -> None:
        """Send ``hello`` to the cluster; `poll` applies the replies when they are in."""
        logger.info("mingle: searching for neighbors")
        self.done = False
        self._replies = None
        ours = list(self.revoked)
        self._thread = threading.Thread(target=self._ask, args=(ours,), name="mingle",
                                        daemon=True)
        self._thread.start()

    def _ask(self, ours: list[str]) -> None:
        # A connection of its own, as Celery's mingle uses the consumer's:
        # not one from the app's pool, which after a broker restart hands out
        # a connection the broker closed (``ConnectionForced`` on first use).
        try:
            with self.app.connection_for_write() as connection:
                peers, answering_self = self._peer_count(connection)
                if peers == 0:
                    replies = {}
                else:
                    # Our own mailbox may already be consuming: it answers the
                    # broadcast too (``{us: None}``, dropped below), and that
                    # reply must not use up the count the wait ends at.
                    limit = None if peers is None else peers + answering_self
                    replies = self._hello(connection, ours, limit)
        except Exception as exc:
            logger.warning("mingle: could not reach the other workers: %r", exc)
            replies = {}
        replies.pop(self.hostname, None)
        self._replies = replies

    def _hello(self, connection: Any, ours: list[str], limit: int | None) -> dict:
        """Celery's ``inspect().hello(...)``, every byte of it on ``connection``.

        ``inspect`` would publish the request through the app's producer
        pool whatever connection it is given (kombu's mailbox uses the pool
        when it has one), and after a RabbitMQ restart the pool's connection
        is the one the broker closed: the request failed with its
        ``ConnectionForced``. The mailbox bound here has no pool, so it
        publishes on this connection's channel; the command, arguments and
        reply handling are Celery's (``Control.broadcast``, ``flatten_reply``).
        """
        from celery.app.control import flatten_reply

        mailbox = self.app.control.mailbox(connection)
        mailbox._producer_pool = None  # the bound copy only; see the docstring
        replies = mailbox._broadcast(
            "hello", {"from_node": self.hostname, "revoked": ours}, None, True,
            self.timeout, limit, None)
        return flatten_reply(replies) if replies else {}

    def _peer_count(self, connection: Any) -> tuple[int | None, int]:
        """How many other nodes listen on the pidbox exchange (None if unknown),
        and 1 if this node's own mailbox queue is bound already, else 0.

        Celery waits the whole reply timeout (1 s) because a broadcast cannot
        know how many will answer. On Redis the exchange's binding table lists
        every node's mailbox queue (kombu sweeps those of dead nodes once their
        queue expires), so the wait can end with the last expected reply, or
        not start at all when this node is alone. Other transports: unknown.
        """
        mailbox = self.app.control.mailbox
        own_queue = f"{self.hostname}.{mailbox.namespace}.pidbox"
        if connection.transport.driver_type != "redis":
            return None, 0
        table = connection.default_channel.get_table(mailbox.exchange.name)
        queues = {queue for _, _, queue in table}
        return len(queues - {own_queue}), int(own_queue in queues)

    def poll(self) -> None:
        """On the consumer thread: merge the replies once they have arrived."""
        if self.done or self._replies is None:
            return
        replies, self._replies = self._replies, None
        self.done = True
        answered = {node: reply for node, reply in replies.items() if reply}
        if not answered:
            logger.info("mingle: all alone")
            return
        logger.info("mingle: sync with %s nodes", len(answered))
        for node, reply in answered.items():
            try:
                clock = reply.get("clock")
                self.app.clock.adjust(clock) if clock else self.app.clock.forward()
                for task_id in reply.get("revoked") or ():
                    self.revoked.add(task_id)
            except Exception as exc:
                logger.exception("mingle: sync with %s failed: %r", node, exc)
        logger.info("mingle: sync complete")
