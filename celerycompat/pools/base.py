"""The one interface every pool offers the consumer.

A pool runs jobs in slots. The consumer decides *when* a job may start (it
counts free slots, so prefetched messages wait in the consumer, unacked, as
Celery's do); the pool only decides *where* it runs: inline (solo), in a
thread, and later in a child process or a greenlet.
"""

from __future__ import annotations

from typing import Callable, Protocol

Job = Callable[[], None]


class Pool(Protocol):
    name: str
    """The implementation name as ``inspect stats`` reports it."""
    limit: int
    """How many jobs may run at once."""
    runs_inline: bool
    """True when ``submit`` runs the job before returning (solo)."""

    def start(self) -> None: ...

    def submit(self, job: Job) -> None:
        """Run ``job`` in a free slot. The caller guarantees one is free."""

    def stop(self, wait: bool = True) -> None:
        """Stop taking jobs; with ``wait`` return only when running jobs are done."""
