"""Per-task-type rate limits: a token bucket per task name and the messages waiting on it.

Celery's worker gives every task type whose ``rate_limit`` is set
(``"10/s"``, ``"100/m"``, ``"5/h"``; a plain number is per second; from the
task, ``task_default_rate_limit`` or ``task_annotations``) a token bucket of
capacity one that refills at that rate. A message of a limited type starts
only when it can take a token; until then it waits, un-acked, in arrival
order behind the other messages of its type. A new bucket starts full, so
the first message of a type never waits. This module is that bookkeeping
and nothing else: no broker, no pool, no clock of its own (the clock is a
parameter, so the tests drive time by hand).

The consumer keeps one `RateLimits` and asks it three things each loop
turn: may this message start now (`admit`), which waiting messages have
their token now (`due`), and how long until the next one will
(`seconds_to_next`), which bounds how long the loop may block in the broker.

Where this differs from Celery (docs/compat.md): changing a rate
(``celery control rate_limit``) applies to the messages already waiting,
and removing it releases them, whereas Celery leaves them on the replaced
bucket at the old rate; a negative or non-finite rate means "no limit"
rather than a bucket that never fills.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any, Callable, Generic, Mapping, TypeVar

from celery.utils.time import rate as celery_rate

T = TypeVar("T")

#: Refill arithmetic is floating point: a token "almost there" (within this)
#: counts as there, or the loop would wake a few nanoseconds early, find
#: nothing due and spin until the float catches up.
EPSILON = 1e-9


def parse_rate(value: Any) -> float:
    """Tokens per second for a ``rate_limit`` value; ``0.0`` for no limit.

    Parsing is Celery's own (``celery.utils.time.rate``), so every spelling
    a Celery worker accepts means the same here and a bad one fails the
    same way: ``ValueError`` for a count that is not a number (``"abc/s"``),
    ``KeyError`` for an unknown unit (``"10/x"``). ``None``, ``""`` and
    ``0`` mean no limit; so do negative, NaN and infinite rates, which
    would otherwise make a bucket that never (or always) has a token.
    """
    tokens_per_second = float(celery_rate(value))
    if not math.isfinite(tokens_per_second) or tokens_per_second <= 0:
        return 0.0
    return tokens_per_second


class TokenBucket:
    """A bucket of capacity one, full when made, refilled at ``rate`` tokens a second."""

    def __init__(self, rate: float, now: float) -> None:
        if not rate > 0:
            raise ValueError(f"a token bucket needs a positive rate, got {rate!r}")
        self.rate = rate
        self._tokens = 1.0
        self._stamp = now

    def _refill(self, now: float) -> float:
        # The stamp moves on even when the bucket is full: time spent full
        # must not be banked as refill for later (no bursts above capacity).
        if now > self._stamp:
            self._tokens = min(1.0, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = max(self._stamp, now)
        return self._tokens

    def take(self, now: float) -> bool:
        """Take a token if one is there."""
        if self._refill(now) + EPSILON >= 1.0:
            self._tokens = max(0.0, self._tokens - 1.0)
            return True
        return False

    def seconds_to_token(self, now: float) -> float:
        """How long until `take` succeeds (0 if it would now)."""
        missing = 1.0 - self._refill(now)
        return 0.0 if missing <= EPSILON else missing / self.rate


class _Lane(Generic[T]):
    """One limited task type: its bucket and its waiting messages, oldest first."""

    __slots__ = ("bucket", "waiting")

    def __init__(self, bucket: TokenBucket, waiting: deque[T] | None = None) -> None:
        self.bucket = bucket
        self.waiting: deque[T] = waiting if waiting is not None else deque()


class RateLimits(Generic[T]):
    """Token buckets by task name, and the items (requests) waiting for a token.

    Items are opaque here; the consumer stores its requests. Every method
    runs on the consumer thread, so nothing is locked.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lanes: dict[str, _Lane[T]] = {}
        self._count = 0

    # -- configuration ---------------------------------------------------------

    def configure(self, tasks: Mapping[str, Any]) -> list[T]:
        """(Re)read every task's ``rate_limit``; returns the waiting items now free to go.

        Called at start and by the ``rate_limit`` control command after it
        changed one task's attribute. A type whose rate is unchanged keeps
        its bucket (its tokens are not reset). A type with a new rate gets a
        new, full bucket and keeps its waiting items, which then go at the
        new rate. A type that lost its limit has its waiting items returned,
        oldest first, for the caller to run.

        Raises:
            ValueError, KeyError: a task's ``rate_limit`` cannot be parsed
                (as a Celery worker fails to start on one).
        """
        rates = {}
        for name, task in tasks.items():
            try:
                rates[name] = parse_rate(getattr(task, "rate_limit", None))
            except (ValueError, KeyError) as exc:
                raise type(exc)(f"invalid rate_limit {task.rate_limit!r} of task {name}: "
                                f"{exc!r}") from exc
        now = self._clock()
        freed: list[T] = []
        for name in list(self._lanes):
            if not rates.get(name):
                lane = self._lanes.pop(name)
                freed.extend(lane.waiting)
                self._count -= len(lane.waiting)
        for name, tokens_per_second in rates.items():
            if not tokens_per_second:
                continue
            lane = self._lanes.get(name)
            if lane is None:
                self._lanes[name] = _Lane(TokenBucket(tokens_per_second, now))
            elif lane.bucket.rate != tokens_per_second:
                lane.bucket = TokenBucket(tokens_per_second, now)
        return freed

    def rate_of(self, name: str) -> float:
        """The tokens per second of a task type, 0.0 if it is not limited."""
        lane = self._lanes.get(name)
        return lane.bucket.rate if lane is not None else 0.0

    # -- messages ----------------------------------------------------------------

    def admit(self, name: str, item: T) -> bool:
        """True: ``item`` may start now (no limit, or it took a token). False: it waits.

        A message never overtakes an older one of its type that is waiting,
        even if a token has just come: that token is the older one's.
        """
        lane = self._lanes.get(name)
        if lane is None:
            return True
        if not lane.waiting and lane.bucket.take(self._clock()):
            return True
        lane.waiting.append(item)
        self._count += 1
        return False

    def due(self) -> list[T]:
        """The waiting items whose token has come (each takes it), oldest first per type."""
        if not self._count:
            return []
        now = self._clock()
        released: list[T] = []
        for lane in self._lanes.values():
            while lane.waiting and lane.bucket.take(now):
                released.append(lane.waiting.popleft())
        self._count -= len(released)
        return released

    def seconds_to_next(self) -> float | None:
        """Seconds until some waiting item's token comes; None when nothing waits."""
        if not self._count:
            return None
        now = self._clock()
        return min(lane.bucket.seconds_to_token(now)
                   for lane in self._lanes.values() if lane.waiting)

    def waiting(self) -> list[T]:
        """Every waiting item (per type, oldest first)."""
        return [item for lane in self._lanes.values() for item in lane.waiting]

    def __len__(self) -> int:
        return self._count

    def clear(self) -> list[T]:
        """Forget every waiting item and return them; buckets keep their tokens."""
        dropped = self.waiting()
        for lane in self._lanes.values():
            lane.waiting.clear()
        self._count = 0
        return dropped
