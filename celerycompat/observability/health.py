"""The rules of the liveness and readiness probes, as pure functions.

Kubernetes restarts a container whose liveness probe fails and stops
routing to (here: counting on) one whose readiness probe fails. A restart
is the right answer to one situation only: the consumer thread is stuck, so
no message is fetched, acked or settled and nothing else will unstick it.
Everything else a worker goes through must keep liveness green:

* **starting** (app import, first connection) and **shutting down** (a warm
  shutdown waits for running tasks; ``terminationGracePeriodSeconds``
  bounds it, not the probe);
* **reconnecting** to the broker: a restart would not bring the broker
  back, and the consumer retries on its own;
* **a task running inline on the consumer thread** (``-P solo``): the loop
  cannot turn until the task returns, which is how solo works, in Celery
  too. The guard against a task that never returns is its time limit
  (``--time-limit``), which ccworker enforces on solo.

So a worker is *stalled* when it is connected, running no inline task, and
its consumer loop has not turned for ``stall_timeout`` seconds: blocked in
a signal receiver, a hook, a broker call that never returns. The loop turns
at least every half second when idle, so the default of 60 s leaves a wide
margin.

Readiness is narrower: ready once connected and consuming, not while
reconnecting or shutting down.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Probe:
    """One probe's answer: ``ok`` decides the HTTP status (200 or 503)."""

    ok: bool
    status: str
    """One word: ``ok``, ``starting``, ``reconnecting``, ``stopping``, ``busy``,
    ``stalled``."""
    detail: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"status": self.status, "detail": self.detail}


def liveness(*, now: float, last_turn: float, stall_timeout: float, connected: bool,
             running_inline: bool, stopping: bool) -> Probe:
    """Failing only for a stalled consumer (module docstring); times are monotonic."""
    age = max(0.0, now - last_turn)
    if stopping:
        return Probe(True, "stopping", "warm shutdown in progress")
    if not connected:
        return Probe(True, "reconnecting", "not connected to the broker (yet)")
    if running_inline:
        return Probe(True, "busy", "a task runs on the consumer thread (solo pool); "
                                   "its time limit guards it")
    if age > stall_timeout:
        return Probe(False, "stalled",
                     f"the consumer loop has not turned for {age:.1f}s "
                     f"(limit {stall_timeout:g}s)")
    return Probe(True, "ok", f"the consumer loop turned {age:.1f}s ago")


def readiness(*, started: bool, connected: bool, stopping: bool) -> Probe:
    """Ready once connected and consuming; not while reconnecting or stopping."""
    if stopping:
        return Probe(False, "stopping", "warm shutdown in progress")
    if not started:
        return Probe(False, "starting", "the worker is not consuming yet")
    if not connected:
        return Probe(False, "reconnecting", "the broker connection was lost; reconnecting")
    return Probe(True, "ok", "connected and consuming")
