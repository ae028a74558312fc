"""Native result replies for Celery's ``rpc://`` backend (contract C17-C19).

The RPC backend stores nothing: each state is a message published to the
default exchange, routed to the client's reply queue (``reply_to`` of the
task message) with ``correlation_id`` = the message's correlation id or the
task id. The client owns and declares that queue; the worker declares
nothing and sends no reply when ``reply_to`` is empty.

We build and serialize the meta ourselves (one encoder for every backend)
and hand kombu an already-encoded body, so the producer does no second
serialization pass. Exchange, delivery mode (``result_persistent``) and
retry policy are read from the app's backend object so they cannot drift
from what ``celery worker`` would use.
"""

from __future__ import annotations

from typing import Any

from celery._state import current_task

from ..protocol import codecs
from .base import NativeStore

__all__ = ("RPCResultStore",)


class RPCResultStore(NativeStore):
    """Publishes each state to the client's reply queue.

    Thread-safe: publishing goes through ``app.producer_pool``, which hands
    each caller its own producer/channel.
    """

    # Celery's RPCBackend.store_result publishes directly (the producer
    # retries connection errors); it does not use the store retry helper.
    uses_store_retry = False

    def __init__(self, app: Any, backend: Any) -> None:
        super().__init__(app, backend)
        self.exchange = backend.exchange
        self.delivery_mode = backend.delivery_mode
        self.retry_policy = backend.retry_policy

    @staticmethod
    def destination_for(task_id: str, request: Any) -> tuple[str | None, str]:
        """``(reply_to, correlation_id)`` for a reply, as Celery computes it.

        Without a request Celery uses the current task's; with neither it
        fails the same way (``RuntimeError``) so callers see one behaviour.
        """
        try:
            request = request or current_task.request
        except AttributeError:
            raise RuntimeError(f"RPC backend missing task request for {task_id!r}") from None
        return request.reply_to, request.correlation_id or task_id

    def _store(
        self, task_id: str, result: Any, state: str, traceback: str | None, request: Any
    ) -> None:
        routing_key, correlation_id = self.destination_for(task_id, request)
        if not routing_key:
            return
        meta = self.encoder.meta(task_id, result, state, traceback, request)
        content_type, content_encoding, body = codecs.dumps(meta, self.encoder.serializer)
        with self.app.producer_pool.acquire(block=True) as producer:
            producer.publish(
                body,
                exchange=self.exchange,
                routing_key=routing_key,
                correlation_id=correlation_id,
                content_type=content_type,
                content_encoding=content_encoding,
                retry=True,
                retry_policy=self.retry_policy,
                declare=self.backend.on_reply_declare(task_id),
                delivery_mode=self.delivery_mode,
            )
