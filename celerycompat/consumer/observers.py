"""The one seam the consumer's optional parts plug into (Dramatiq's middleware idea).

Task events (``-E``), the metrics (``--metrics-port``), the autoscaler
(``--autoscale``), gossip, native delayed delivery (quorum queues), the
project's own consumer steps (project_steps.py) and its tasks' own Request
classes (project_requests.py) each want to hear about the same
moments of a task's life and of the loop. Instead of
one ``if self.x is not None`` branch per part at every such moment, the
consumer calls each hook once on an `Observers`, which calls the parts that
implement it, in the order they were added.

The hooks (an observer implements any subset, with these signatures):

* ``connected(broker)``: a broker connection is up and consuming (every
  reconnection); a connection error raised here is a connection lost while
  setting up (the consumer starts over);
* ``disconnected()``: the connection was lost (after it was abandoned, before
  the held requests are dropped and a new one is made);
* ``turned()``: one turn of the consumer loop, after finished tasks are settled;
* ``ticked()``: the turn's event tick (only with an event dispatcher): under
  the event connection's watchdog, after the heartbeat, before the turn's
  events are flushed;
* ``received(request)``: a task message accepted (after ``task_received``);
* ``started(request)``: handed to the pool;
* ``finished(request, outcome, decision)``: its outcome settled (`execution.outcome.Settle`);
* ``revoked(request, *, terminated, signum, expired)``: discarded as revoked or
  expired, or terminated;
* ``cancelled(request)``: cancelled after a connection loss (``acks_late``)
  or by a cold shutdown;
* ``unknown(task_id, name)``: a task this worker does not know;
* ``closed()``: the consumer closes for good (after its loop, before its
  connection is closed).

A hook with no observer costs a call to a no-op; with one, a direct call to
its bound method. Observers run on the consumer thread and must not block;
the one exception is where Celery's consumer blocks too (native delayed
delivery declares its exchanges in ``connected``, before the first message).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

HOOKS = ("connected", "disconnected", "turned", "ticked", "received", "started", "finished",
         "revoked", "cancelled", "unknown", "closed")


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _fan_out(calls: list[Callable[..., Any]]) -> Callable[..., Any]:
    if not calls:
        return _nothing
    if len(calls) == 1:
        return calls[0]

    def every(*args: Any, **kwargs: Any) -> None:
        for call in calls:
            call(*args, **kwargs)

    return every


class Observers:
    """The consumer's observers; each hook in `HOOKS` is an attribute to call."""

    connected: Callable[[Any], None]
    disconnected: Callable[[], None]
    turned: Callable[[], None]
    ticked: Callable[[], None]
    received: Callable[[Any], None]
    started: Callable[[Any], None]
    finished: Callable[[Any, Any, Any], None]
    revoked: Callable[..., None]
    cancelled: Callable[[Any], None]
    unknown: Callable[[str, str], None]
    closed: Callable[[], None]

    def __init__(self, observers: Iterable[Any] = ()) -> None:
        self.members: list[Any] = []
        for observer in observers:
            self.add(observer)
        self._bind()

    def add(self, observer: Any) -> None:
        """Add ``observer`` after the others (None is ignored)."""
        if observer is not None and observer not in self.members:
            self.members.append(observer)
            self._bind()

    def _bind(self) -> None:
        for hook in HOOKS:
            calls = [getattr(member, hook) for member in self.members
                     if callable(getattr(member, hook, None))]
            setattr(self, hook, _fan_out(calls))
