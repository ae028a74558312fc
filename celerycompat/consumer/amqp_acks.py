"""Runs of AMQP acks sent as one ``basic.ack(multiple=True)`` (issue 18, item 3).

An AMQP delivery tag counts up per channel, and ``basic.ack`` with
``multiple`` set acknowledges every delivery of the channel not yet
settled whose tag is at most the one sent. So the acks a consumer turn
owes can go as one frame when they cover the oldest unsettled deliveries
of the channel: a drain of short tasks finishes them about in delivery
order. What must never happen is acking a delivery still in hand: an ETA
task held for later, a rate-limited one, a task still running. So a run
ends at the first unsettled delivery nobody owes an ack for; the acks
past it go one by one, as before.

Pure bookkeeping, no I/O: `AckRuns` is told what was delivered and what
is owed, and `take` says which frames to send. The adapter
(kombu_broker.py) sends them.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class AckRuns(Generic[T]):
    """The unsettled deliveries of one channel, in tag order, and the acks owed.

    ``settled`` tells whether a delivery was settled some other way than
    through `owe` or `discard` (an ack sent by a project's own Request
    class): such a delivery no longer stops a run, since ``multiple`` only
    touches deliveries the broker still counts as unacked.
    """

    def __init__(self, tag_of: Callable[[T], int], settled: Callable[[T], bool]) -> None:
        self._tag_of = tag_of
        self._settled = settled
        #: Deliveries not known to be settled, by tag. Tags only grow on a
        #: channel, so insertion order is tag order, and a dict drops one
        #: from anywhere in O(1) (an ETA task may hold the head for hours).
        self._unsettled: dict[int, T] = {}
        #: Acks owed and not sent yet, by tag.
        self._owed: dict[int, T] = {}

    def delivered(self, item: T) -> None:
        """A delivery arrived on this channel."""
        self._unsettled[self._tag_of(item)] = item

    def owe(self, item: T) -> None:
        """``item`` is to be acked with the next `take`."""
        self._owed[self._tag_of(item)] = item

    def discard(self, item: T) -> None:
        """``item`` was settled otherwise (rejected): it stops no run."""
        self._unsettled.pop(self._tag_of(item), None)

    @property
    def owed(self) -> int:
        """How many acks wait for the next `take`."""
        return len(self._owed)

    @property
    def unsettled(self) -> int:
        """How many deliveries are still listed as in hand."""
        return len(self._unsettled)

    def take(self) -> tuple[T | None, list[T]]:
        """The frames for the acks owed: (``last``, ``singles``).

        ``last``, when not None, is acked with ``multiple=True``: it and every
        delivery before it are settled by that one frame (at least two owed
        acks among them, else it is a single). ``singles`` are acked one by
        one. Everything owed is in exactly one of the two.
        """
        owed, unsettled = self._owed, self._unsettled
        if not owed:
            return None, []
        last: T | None = None
        run: list[int] = []
        covered = 0
        for tag, item in unsettled.items():
            if tag in owed:
                last = item
                covered += 1
            elif not self._settled(item):
                break
            run.append(tag)
        for tag in run:
            del unsettled[tag]
            owed.pop(tag, None)
        singles = list(owed.values())
        for tag in owed:
            unsettled.pop(tag, None)
        owed.clear()
        if covered == 1:
            singles.insert(0, last)
            last = None
        return last, singles
