"""``--autoscale max,min``: the pool grows and shrinks with the work at hand.

The rules are Celery's (``celery/worker/autoscale.py``), so a deployment
tuned for Celery's autoscaler behaves the same:

* the work at hand (``qty``) is the number of requests reserved: waiting for
  a slot or running (Celery's ``reserved_requests``); messages held for
  their ETA or a rate-limit token do not count;
* **up**, as soon as ``min(qty, max)`` exceeds the slot count: grow by the
  difference ("Scaling up N processes.");
* **down**, when ``max(qty, min)`` is below the slot count and ``keepalive``
  seconds (``AUTOSCALE_KEEPALIVE``, 30 by default: Celery's variable) have
  passed since the last scale-up and since the last task was received:
  shrink by the difference ("Scaling down N processes."). A prefork pool
  stops idle children only; when too few are idle it stops those and says
  so at debug level, and the next check tries again;
* the pool starts with ``min`` slots; the prefetch count is computed from
  ``max`` (``max x worker_prefetch_multiplier``), whatever the slot count;
* ``celery control autoscale MAX [MIN]`` (`Autoscaler.update`) moves the
  bounds: a lower ``max`` shrinks now, a higher ``min`` grows now, and the
  prefetch count follows ``max``; ``pool_grow``/``pool_shrink`` are refused
  while autoscaling, with Celery's replies.

Celery runs its autoscaler in a thread that looks once a second (on prefork:
at every message received, and every ``keepalive`` seconds). Ours is ticked
by the consumer loop on its own thread (no lock against remote control,
which runs there too): a scale-up is decided on the turn after the task
arrives; a scale-down is tried at most once a second. The decisions are the
pure functions `scale_delta` and `may_scale_down`.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

logger = logging.getLogger("celery.worker.autoscale")

#: Celery's ``AUTOSCALE_KEEPALIVE``: seconds of quiet before scaling down.
DEFAULT_KEEPALIVE = 30.0
#: How often a scale-down is tried while one is due.
SCALE_DOWN_EVERY = 1.0


def keepalive_from_env() -> float:
    """``AUTOSCALE_KEEPALIVE`` as Celery reads it (seconds, 30 by default)."""
    return float(os.environ.get("AUTOSCALE_KEEPALIVE", DEFAULT_KEEPALIVE))


def scale_delta(processes: int, qty: int, max_concurrency: int, min_concurrency: int) -> int:
    """How many slots to add (> 0) or remove (< 0) for ``qty`` reserved requests.

    Celery's ``Autoscaler._maybe_scale``: up to ``min(qty, max)`` if that is
    more than there are; else down to ``max(qty, min)`` if that is fewer.
    """
    wanted = min(qty, max_concurrency)
    if wanted > processes:
        return wanted - processes
    wanted = max(qty, min_concurrency)
    if wanted < processes:
        return wanted - processes
    return 0


def may_scale_down(now: float, last_scale_up: float | None, last_received: float | None,
                   keepalive: float) -> bool:
    """Celery's ``Autoscaler.scale_down`` gate: ``keepalive`` seconds since the
    latest of the last scale-up and the last task received (never before either)."""
    last_active = last_scale_up
    if last_received is not None and (last_active is None or last_received > last_active):
        last_active = last_received
    return last_active is not None and now - last_active > keepalive


class Autoscaler:
    """Grows and shrinks ``pool`` between ``min`` and ``max`` slots.

    ``qty()`` counts the reserved requests; ``on_max_changed(max)`` is called
    when the ``autoscale`` command moves ``max`` (the consumer's prefetch
    count follows it). Every method runs on the consumer thread.
    """

    def __init__(self, pool: Any, max_concurrency: int, min_concurrency: int = 0, *,
                 qty: Callable[[], int],
                 on_max_changed: Callable[[int], None] = lambda new_max: None,
                 keepalive: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.max_concurrency = int(max_concurrency)
        self.min_concurrency = int(min_concurrency)
        self.keepalive = keepalive_from_env() if keepalive is None else float(keepalive)
        if not self.keepalive:
            raise ValueError("cannot scale down too fast: AUTOSCALE_KEEPALIVE must not be 0")
        self._qty = qty
        self._on_max_changed = on_max_changed
        self._clock = clock
        self._last_scale_up: float | None = None
        self._last_received: float | None = None
        self._next_down_try = 0.0

    @property
    def processes(self) -> int:
        """The pool's slot count (Celery: ``pool.num_processes``)."""
        return int(self.pool.limit)

    @property
    def qty(self) -> int:
        return int(self._qty())

    # -- the consumer's hooks ------------------------------------------------------

    # -- consumer hooks (consumer/observers.py) -------------------------------------

    def received(self, request: Any = None) -> None:
        """A task message was received: no scale-down for ``keepalive`` seconds."""
        self._last_received = self._clock()

    def turned(self) -> None:
        """One look at the work at hand (every consumer loop turn)."""
        now = self._clock()
        delta = scale_delta(self.processes, self.qty, self.max_concurrency,
                            self.min_concurrency)
        if delta > 0:
            self._last_scale_up = now
            self._grow(delta)
        elif delta < 0 and now >= self._next_down_try and may_scale_down(
                now, self._last_scale_up, self._last_received, self.keepalive):
            self._next_down_try = now + SCALE_DOWN_EVERY
            self._shrink(-delta)

    # -- the ``autoscale`` control command ---------------------------------------------

    def update(self, max: int | None = None, min: int | None = None) -> tuple[int, int]:
        """New bounds (either may be None: unchanged); returns ``(max, min)``.

        As Celery's: a ``max`` below the slot count shrinks now, a ``min``
        above it grows now; the bounds are not checked against each other.
        """
        if max is not None:
            max = int(max)
            if max < self.processes:
                self._shrink(self.processes - max)
            changed = max != self.max_concurrency
            self.max_concurrency = max
            if changed:
                self._on_max_changed(max)
        if min is not None:
            min = int(min)
            if min > self.processes:
                self._grow(min - self.processes)
            self.min_concurrency = min
        return self.max_concurrency, self.min_concurrency

    def info(self) -> dict[str, int]:
        """The ``autoscaler`` section of ``inspect stats``, as Celery's."""
        return {"max": self.max_concurrency, "min": self.min_concurrency,
                "current": self.processes, "qty": self.qty}

    # -- resizing ----------------------------------------------------------------------

    def _grow(self, n: int) -> None:
        logger.info("Scaling up %s processes.", n)
        self.pool.grow(n)

    def _shrink(self, n: int) -> None:
        logger.info("Scaling down %s processes.", n)
        try:
            self.pool.shrink(n)
        except ValueError:
            logger.debug("Autoscaler won't scale down: all processes busy.")
        except Exception as exc:
            logger.error("Autoscaler: scale_down: %r", exc, exc_info=True)
