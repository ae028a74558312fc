"""``--autoscale``: the scaling decisions, against Celery's own autoscaler.

The oracle is ``celery.worker.autoscale.Autoscaler`` itself, driven with a
recording pool and a given number of reserved requests: for every state,
ours must grow or shrink by what Celery's does. The time gate (no
scale-down until ``keepalive`` seconds after the last scale-up and the last
task received) and the ``autoscale`` command's ``update`` are checked the
same way, with an injected clock.
"""

from __future__ import annotations

import pytest
from celery.worker import autoscale as celery_autoscale
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import projects  # noqa: F401  (the fixture: run inside tests/unit/projects)

from celerycompat.cli import parse_worker_options
from celerycompat.consumer.autoscale import Autoscaler, may_scale_down, scale_delta


class RecordingPool:
    """A pool that only counts slots, as the autoscaler sees one."""

    def __init__(self, limit: int, busy: int = 0) -> None:
        self.limit = limit
        self.busy = busy
        self.calls: list[tuple[str, int]] = []

    @property
    def num_processes(self) -> int:  # Celery's name
        return self.limit

    def grow(self, n: int = 1) -> None:
        self.calls.append(("grow", n))
        self.limit += n

    def shrink(self, n: int = 1) -> None:
        self.calls.append(("shrink", n))
        idle = self.limit - self.busy
        self.limit -= min(n, idle)
        if idle < n:
            raise ValueError("Can't shrink pool. All processes busy!")

    def maintain_pool(self) -> None:
        pass


class CeleryScaler(celery_autoscale.Autoscaler):
    """Celery's autoscaler with ``qty`` given instead of read from worker state."""

    reserved = 0

    @property
    def qty(self) -> int:
        return self.reserved


def celerys_calls(processes: int, qty: int, max_: int, min_: int, busy: int = 0) -> list:
    pool = RecordingPool(processes, busy)
    scaler = CeleryScaler(pool, max_, min_, keepalive=30)
    scaler.reserved = qty
    scaler._last_scale_up = celery_autoscale.monotonic() - 3600  # long quiet: may scale down
    scaler.maybe_scale()
    return pool.calls


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ours(processes: int, qty: int, max_: int, min_: int, busy: int = 0,
         quiet: bool = True) -> tuple[Autoscaler, RecordingPool, Clock]:
    pool = RecordingPool(processes, busy)
    clock = Clock()
    scaler = Autoscaler(pool, max_, min_, qty=lambda: qty, keepalive=30, clock=clock)
    if quiet:
        scaler._last_scale_up = clock.now - 3600
    return scaler, pool, clock


@settings(max_examples=300, deadline=None)
@given(processes=st.integers(0, 12), qty=st.integers(0, 20), max_=st.integers(0, 12),
       min_=st.integers(0, 12), busy=st.integers(0, 12))
def test_decisions_are_celerys(processes, qty, max_, min_, busy):
    busy = min(busy, processes)
    scaler, pool, _ = ours(processes, qty, max_, min_, busy)
    scaler.turned()
    assert pool.calls == celerys_calls(processes, qty, max_, min_, busy)


@pytest.mark.parametrize("processes, qty, max_, min_, delta", [
    (1, 6, 4, 1, 3),    # load: up to max
    (1, 2, 4, 1, 1),    # up to the work at hand
    (4, 0, 4, 1, -3),   # idle: down to min
    (4, 2, 4, 1, -2),   # down to the work at hand
    (2, 2, 4, 1, 0),
    (0, 0, 4, 0, 0),    # --autoscale=4,0 at rest
    (0, 1, 4, 0, 1),
    (5, 0, 3, 4, -1),   # min above max: Celery's rules, unchecked
])
def test_scale_delta(processes, qty, max_, min_, delta):
    assert scale_delta(processes, qty, max_, min_) == delta


def test_scale_down_waits_for_keepalive_after_the_last_task_and_scale_up():
    assert not may_scale_down(100.0, None, None, 30)  # nothing ever happened
    assert not may_scale_down(100.0, 80.0, None, 30)
    assert may_scale_down(100.0, 60.0, None, 30)
    assert not may_scale_down(100.0, 60.0, 90.0, 30)  # a task came since
    assert may_scale_down(100.0, 10.0, 60.0, 30)


def test_grows_at_once_and_shrinks_only_after_keepalive():
    qty = [3]
    pool = RecordingPool(1)
    clock = Clock()
    scaler = Autoscaler(pool, 4, 1, qty=lambda: qty[0], keepalive=30, clock=clock)
    scaler.received()
    scaler.turned()
    assert pool.calls == [("grow", 2)] and pool.limit == 3
    qty[0] = 0
    clock.now += 29
    scaler.turned()
    assert pool.calls == [("grow", 2)]  # not quiet for long enough
    clock.now += 2
    scaler.turned()
    assert pool.calls[-1] == ("shrink", 2) and pool.limit == 1
    assert scaler.info() == {"max": 4, "min": 1, "current": 1, "qty": 0}


def test_a_busy_pool_is_asked_again_once_a_second():
    pool = RecordingPool(4, busy=4)
    clock = Clock()
    scaler = Autoscaler(pool, 4, 1, qty=lambda: 0, keepalive=30, clock=clock)
    scaler._last_scale_up = clock.now - 60
    scaler.turned()
    scaler.turned()
    assert pool.calls == [("shrink", 3)]  # ValueError swallowed, not retried at once
    clock.now += 1.5
    scaler.turned()
    assert pool.calls == [("shrink", 3), ("shrink", 3)]


@pytest.mark.parametrize("processes, update", [
    (4, {"max": 2}), (1, {"min": 3}), (2, {"max": 6, "min": 3}), (3, {"max": 3}),
    (3, {}), (5, {"max": 2, "min": 4}),
])
def test_update_is_celerys(processes, update):
    class Consumer:
        def __init__(self):
            self.diffs = []

        def _update_prefetch_count(self, diff):
            self.diffs.append(diff)

    class Worker:
        consumer = Consumer()

    celery_pool = RecordingPool(processes)
    celery_scaler = CeleryScaler(celery_pool, 4, 1, worker=Worker(), keepalive=30)
    maxes = []
    scaler, pool, _ = ours(processes, 0, 4, 1)
    scaler._on_max_changed = maxes.append
    assert scaler.update(**update) == celery_scaler.update(**update)
    assert pool.calls == celery_pool.calls
    # Celery moves the prefetch count by the change of max; ours recomputes it from max.
    assert [4 + diff for diff in Worker.consumer.diffs] == maxes


def test_keepalive_comes_from_celerys_variable(monkeypatch):
    monkeypatch.setenv("AUTOSCALE_KEEPALIVE", "2.5")
    scaler = Autoscaler(RecordingPool(1), 2, 1, qty=lambda: 0)
    assert scaler.keepalive == 2.5
    with pytest.raises(ValueError):
        Autoscaler(RecordingPool(1), 2, 1, qty=lambda: 0, keepalive=0)


@pytest.mark.usefixtures("projects")
def test_autoscale_is_honoured_but_on_solo():
    threads = parse_worker_options(["-A", "plainmod", "-P", "threads", "--autoscale", "4,1"])
    assert threads.autoscale == (4, 1)
    assert not any("autoscale" in line for line in threads.unsupported)
    solo = parse_worker_options(["-A", "plainmod", "-P", "solo", "--autoscale", "4,1"])
    assert [line for line in solo.unsupported if "autoscale" in line] == [
        "ccworker: --autoscale is ignored by the solo pool, which runs one task at a time"]
