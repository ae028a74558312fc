"""What the consumer holds for a task message, and the lines it logs about messages.

`Request` is a task message the worker accepted: the delivery, the parsed
`TaskMessage`, the task, and the little state the consumer keeps on it (acked,
started, terminated). It also offers the read-only surface of Celery's own
worker ``Request`` that ``task_received`` receivers and ``inspect`` replies
read. `UnknownTaskRequest` is what a result backend needs to store
``NotRegistered`` for a task this worker does not know.

The log texts are Celery's, word for word (its ``celery.worker.consumer`` and
``celery.worker.strategy`` modules): operators grep for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from celery.utils.saferepr import saferepr

from celerycompat.consumer.broker import Delivery
from celerycompat.protocol import message as wire

CANCELLED_ON_CONNECTION_LOSS = (
    "Task %s cannot be acknowledged after a connection loss since late acknowledgement "
    "is enabled for it.\nTerminating it instead.\n"
)
UNKNOWN_MESSAGE = (
    "Received and deleted unknown message.  Wrong destination?!?\n\n"
    "The full contents of the message body was: %s\n"
)
UNKNOWN_TASK = (
    "Received unregistered task of type %s.\n"
    "The message has been ignored and discarded.\n\n"
    "Did you remember to import the module containing this task?\n"
    "Or maybe you're using relative imports?\n\n"
    "Please see\nhttps://docs.celeryq.dev/en/latest/internals/protocol.html\n"
    "for more information.\n\n"
    "The full contents of the message body was:\n%s\n\n"
    "The full contents of the message headers:\n%s\n\n"
    "The delivery info for this task is:\n%s\n"
)
INVALID_TASK = (
    "Received invalid task message: %s\n"
    "The message has been ignored and discarded.\n\n"
    "Please ensure your message conforms to the task\n"
    "message protocol as described here:\n"
    "https://docs.celeryq.dev/en/latest/internals/protocol.html\n\n"
    "The full contents of the message body was:\n%s\n"
)
DECODE_ERROR = (
    "Can't decode message body: %r [type:%r encoding:%r headers:%s]\n\nbody: %s\n"
)


def dump_body(delivery: Delivery) -> str:
    """The body as Celery shows it in these log lines: a bounded repr and its size."""
    body = delivery.body or b""
    return f"{saferepr(body, 1024)} ({len(body)}b)"


@dataclass(eq=False)
class Request:
    """A task message the worker accepted and will run (or hold until its ETA).

    Compared and hashed by identity, as Celery's (``worker.state`` keeps
    requests in weak sets).
    """

    delivery: Delivery
    message: wire.TaskMessage
    task: Any
    generation: int
    acked: bool = False
    ack_pending: bool = False
    """Counted as acked, but the broker ack is sent once the task is over (solo),
    or once its result is written (``ack_rides``)."""
    ack_rides: bool = False
    """Its early ack is made by the run, with the result where it can be
    (backends/riding_acks.py); the consumer's own ack follows the result."""
    time_start: float | None = None
    context: Any = field(default=None, repr=False)
    pid_lookup: Callable[[str], Any] | None = field(default=None, repr=False)
    """``pool.pid_for``, set when the request starts (``worker_pid`` in info)."""
    terminated: bool = False
    """``revoke(terminate=True)`` ended it: REVOKED announced, its slot still
    held until the pool reports the run gone (`Consumer.terminate`)."""
    project_request: Any = field(default=None, repr=False)
    """An object of the task's own ``Request`` class (consumer/project_requests.py)."""

    @property
    def acks_late(self) -> bool:
        return bool(self.task.acks_late)

    # The read-only surface of Celery's worker Request that ``task_received``
    # receivers use (``request.id``, ``request.name``, ``request.args``...).

    @property
    def id(self) -> str:
        return self.message.id

    @property
    def name(self) -> str:
        return self.message.name

    @property
    def type(self) -> str:
        return self.message.task

    @property
    def args(self) -> Any:
        return self.message.args

    @property
    def kwargs(self) -> Any:
        return self.message.kwargs

    @property
    def argsrepr(self) -> str:
        return self.message.argsrepr

    @property
    def kwargsrepr(self) -> str:
        return self.message.kwargsrepr

    @property
    def eta(self) -> Any:
        return self.message.eta

    @property
    def expires(self) -> Any:
        return self.message.expires

    @property
    def root_id(self) -> Any:
        return self.message.root_id

    @property
    def parent_id(self) -> Any:
        return self.message.parent_id

    @property
    def delivery_info(self) -> dict[str, Any]:
        return self.message.delivery_info

    @property
    def request_dict(self) -> dict[str, Any]:
        return self.message.request

    @property
    def hostname(self) -> Any:
        return self.message.request.get("hostname")

    def info(self, safe: bool = False) -> dict[str, Any]:
        """The request-info dict of ``inspect active/reserved/scheduled`` (F9)."""
        message = self.message
        return {
            "id": message.id,
            "name": message.name,
            "args": message.argsrepr if safe else message.args,
            "kwargs": message.kwargsrepr if safe else message.kwargs,
            "type": message.task,
            "hostname": self.hostname,
            "time_start": self.time_start,
            "acknowledged": self.acked,
            "delivery_info": message.delivery_info,
            "worker_pid": self.pid_lookup(message.id)
            if self.time_start is not None and self.pid_lookup is not None else None,
        }


@dataclass
class UnknownTaskRequest:
    """The little a backend needs to store NotRegistered (as Celery's Bunch)."""

    name: str
    root_id: Any
    correlation_id: Any
    reply_to: Any
    chord: Any = None
    errbacks: Any = None
    group: Any = None
    parent_id: Any = None
    ignore_result: bool = False
