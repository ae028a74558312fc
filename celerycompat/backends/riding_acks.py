"""Acks that ride with result writes: a killed worker leaves both or neither.

Why (issue 19): a message's ack and its task's result are two writes. On
Redis, with group commit (group_commit.py), the ack of an ``acks_late``
task waited for its batched SUCCESS write and then for the consumer's next
poll: a worker killed in between left the result stored and the message
un-acked, so the task ran a second time after ``visibility_timeout``. The
reverse held for an early ack: acked at the start, its SUCCESS still queued
when the worker died, the task had run to its end with no result and no
message left to run it again.

Where the broker and the result backend are the same Redis server (the
usual deployment) the two writes can be one: the store's script writes the
result and removes the message from kombu's ``unacked``/``unacked_index`` in
the same call (Lua scripts are atomic, and may ``SELECT`` the broker's
database without changing the connection's). The consumer hands the run an
`AckTicket`; the store of the process running the task uses it:

* ``acks_late``: the deferred SUCCESS write carries the ack.
* early ack: the ack is held in the store's writer when the task starts
  (Celery acks before the task runs), for up to ``EARLY_ACK_DELAY``. If
  the task succeeds in that time its SUCCESS joins it (one atomic call,
  still deferred); if the ack is out already, the SUCCESS is written before
  the task's slot is free (synchronously), so an acked message never waits
  for a deferred result.

The consumer still sends its own ack when it settles the message (removing
a removed tag is a no-op), so nothing depends on the riding ack arriving:
it only makes the ack earlier and atomic with the result.

With the results on another Redis server only the consumer can ack, but
an early ack must still not land before a deferred SUCCESS. The ticket then
names no server (a *notice* ticket): the run holds it the same way, and
when it comes due alone (the task is still running) the writer calls
`ack_due` with the key, which reaches the consumer (prefork: through the
parent); a SUCCESS that joins it is written first, and the consumer acks
once it has landed. Not on RabbitMQ: an ack held back dies with a closed
channel and the task runs again, which Celery's ack at the start avoids
(docs/reliability.md); there the early ack stays the consumer's, at once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from celerycompat.runlocal import RunLocal

__all__ = ("AckTicket", "Ride", "ack_due", "current", "on_ack_due", "server_of")


class AckTicket(NamedTuple):
    """What a result store needs to ack one message of kombu's Redis transport.

    Plain data: it crosses to prefork children inside the task message (a
    named tuple: one is made and pickled per task, cheaply).
    """

    server: tuple | None
    """`server_of` the broker's client: the store acks only on the same
    server. None: a notice ticket (the consumer acks when told, `ack_due`)."""
    db: int
    unacked: str
    unacked_index: str
    tag: str
    early: bool
    """Early ack (at the start) rather than ``acks_late`` (with the SUCCESS)."""


def server_of(client: Any) -> tuple | None:
    """Who a redis-py client talks to (host, port, unix path, user), or None
    when that is not fixed (Sentinel, a custom connection class)."""
    try:
        pool = client.connection_pool
        kwargs = pool.connection_kwargs
    except AttributeError:
        return None
    if "Sentinel" in type(pool).__name__ or ("host" not in kwargs and "path" not in kwargs):
        return None
    return (kwargs.get("host"), kwargs.get("port"), kwargs.get("path"),
            kwargs.get("username"))


class Ride:
    """One run's ticket; for an early ack, the writer item it waits in and
    that item's completion (a `group_commit.Write`)."""

    __slots__ = ("ticket", "item", "write")

    def __init__(self, ticket: AckTicket) -> None:
        self.ticket = ticket
        self.item: Any = None
        self.write: Any = None


_local = RunLocal("riding_acks")


def begin(ride: Ride | None) -> None:
    """The current run's ride (None: no ticket) for this thread or greenlet."""
    _local.set("ride", ride)


def current() -> Ride | None:
    return _local.get("ride")


_notice: Any = None


def on_ack_due(handler: Any) -> None:
    """Who is told that a notice ticket's early ack is due: the consumer
    (``handler(tag)``, from any thread), or in a prefork child the pipe to
    the parent. None: nobody (a process that runs no consumer)."""
    global _notice
    _notice = handler


def ack_due(tag: str) -> None:
    """A held early ack of a notice ticket came due without a SUCCESS."""
    handler = _notice
    if handler is not None:
        handler(tag)
