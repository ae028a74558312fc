"""Holding: the messages a consumer keeps before a slot can take them, and
the prefetch count that follows from them (B12, B34).

A delivered request is reserved at once, or held: until its ETA (a heap by
time), or until its task type's rate-limit token comes (ratelimits.py).
Every held message raises the prefetch count by one, so held ones never
take the slots other tasks arrive through; ``worker_eta_task_limit`` caps
that growth, and past AMQP's 16 bits kombu's QoS rule asks for no limit.

These are the `Consumer`'s methods (a mixin); what they use of it is
listed on `Holding`.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from typing import Any

from celerycompat.consumer.ratelimits import RateLimits
from celerycompat.consumer.request import Request

logger = logging.getLogger("celery.worker.consumer.consumer")

#: AMQP's ``basic.qos`` prefetch count is 16 bits; past it kombu's QoS asks for none.
PREFETCH_COUNT_MAX = 0xFFFF


class Holding:
    """The `Consumer`'s holding and prefetch count (module docstring).

    What it uses of the consumer: ``app``, ``pool``, ``broker``,
    ``generation``, ``prefetch_multiplier``, ``prefetch_slots``,
    ``eta_task_limit``, ``rate_limits``, ``reserved``, ``_eta`` and
    ``_qos_over``.
    """

    app: Any
    pool: Any
    broker: Any
    generation: int
    prefetch_multiplier: int
    prefetch_slots: int | None
    eta_task_limit: int | None
    rate_limits: RateLimits[Request] | None
    reserved: deque[Request]
    _eta: list[tuple[float, int, Request]]
    _qos_over: bool

    @property
    def prefetch_count(self) -> int:
        """Celery's count: slots x multiplier, plus one per held ETA task (B12, B34).

        Plus one per request waiting for a rate-limit token, which Celery
        does not add: there a flood of one rate-limited type fills every
        prefetch slot and other types wait behind it (docs/compat.md).
        """
        if not self.prefetch_multiplier:
            return 0
        waiting = len(self.rate_limits) if self.rate_limits is not None else 0
        slots = self.pool.limit if self.prefetch_slots is None else self.prefetch_slots
        base = max(slots, 1) * self.prefetch_multiplier
        held = len(self._eta) + waiting
        if held and self.eta_task_limit is not None:
            # ``worker_eta_task_limit``: Celery's QoS stops growing at this
            # value, so at most that many messages are held in memory.
            return max(1, min(base + held, self.eta_task_limit))
        return base + held

    def _admit(self, request: Request) -> bool:
        """Reserve the request, or make it wait for its type's rate-limit token.

        Returns False when it waits. As in Celery, a message with an ETA
        takes its token only once the ETA has come.
        """
        if self.rate_limits is not None and \
                not self.rate_limits.admit(request.task.name, request):
            return False
        self.reserved.append(request)
        return True

    def _release_rate_limited(self) -> None:
        """Requests whose token has come join the reserved ones (revoked ones are
        discarded there, having used their token, as in Celery)."""
        if self.rate_limits is None or not len(self.rate_limits):
            return
        released = self.rate_limits.due()
        if released:
            self.reserved.extend(released)
            self._update_prefetch()

    def reset_rate_limits(self) -> None:
        """Re-read every task's ``rate_limit`` (the ``rate_limit`` control command).

        Requests waiting on a type whose limit was removed are reserved now;
        those of a type whose rate changed go at the new rate.
        """
        if self.rate_limits is None:
            return
        freed = self.rate_limits.configure(self.app.tasks)
        if freed:
            self.reserved.extend(freed)
            self._update_prefetch()

    def _qos_value(self) -> int:
        """What the broker is told: kombu's QoS rule, no limit past AMQP's 16 bits."""
        count = self.prefetch_count
        was_over, self._qos_over = self._qos_over, count > PREFETCH_COUNT_MAX
        if self._qos_over:
            if not was_over:
                logger.warning("QoS: Disabled: prefetch_count exceeds %r", PREFETCH_COUNT_MAX)
            return 0
        return count

    def _update_prefetch(self) -> None:
        if self.broker is not None:
            self.broker.set_prefetch(self._qos_value())

    def _release_due_eta(self) -> None:
        if not self._eta:
            return
        now = time.time()
        released = False
        while self._eta and self._eta[0][0] <= now:
            _, _, request = heapq.heappop(self._eta)
            if request.generation == self.generation:
                self._admit(request)
            released = True
        if released:
            self._update_prefetch()
