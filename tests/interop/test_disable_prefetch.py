"""``--disable-prefetch`` / ``worker_disable_prefetch``: no message is reserved
for a busy slot (Celery #1933, #4494).

Two long tasks fill a two-slot worker; four short ones are sent behind
them. With prefetching off they stay in the queue (another worker could take
them) until a slot frees, and ``inspect reserved`` is empty meanwhile.

* Redis: compared with ``celery worker --disable-prefetch``, which gates
  kombu's fetch on its running-plus-reserved count.
* RabbitMQ: Celery ignores the setting there (a warning, then the usual
  ``concurrency x multiplier`` prefetch); ccworker narrows the QoS window to
  what is in hand plus the free slots and cancels consuming while there are
  none, so the same promise holds. The difference is asserted, everything
  else compared.

Both ack policies: an early-ack task's ack frees a QoS slot the moment it
starts, the case a static prefetch count of ``concurrency`` gets wrong.
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

#: Long enough that the short tasks, if prefetched, are seen waiting.
LONG = 2.0


def held_back_scenario(acks_late: bool):
    def scenario(app, observe):
        longs = [observe.send("slow_started", (LONG,), acks_late=acks_late) for _ in range(2)]
        for result in longs:
            wait_started(observe, result.id)
        shorts = [observe.send("add", (i, i), acks_late=acks_late) for i in range(4)]
        time.sleep(0.8)  # room for a prefetch to happen, were it going to
        observe.queue_depth("depth-while-busy")
        node = observe.worker.nodename
        replies = app.control.inspect(destination=[node], timeout=3.0).reserved() or {}
        observe.record("reserved-while-busy", replies.get(node))
        observe.record("longs", [r.get(timeout=20) for r in longs])
        observe.record("shorts", [r.get(timeout=20) for r in shorts])
        observe.queue_depth("depth-after")
    return scenario


def wait_started(observe, task_id: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw, _ = observe.meta_raw(task_id)
        if raw is not None and b'"STARTED"' in raw:
            return
        time.sleep(0.02)
    raise AssertionError(f"task {task_id} never started")


@pytest.mark.parametrize("pool", ["threads", "prefork"])
@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks-late"])
def test_no_message_reserved_for_a_busy_slot(broker, run_differential, pool, acks_late):
    celery_obs, cc_obs = run_differential(
        held_back_scenario(acks_late), broker, pool=pool, concurrency=2,
        extra_flags=("--disable-prefetch",))
    assert cc_obs["depth-while-busy"] == 4
    assert cc_obs["reserved-while-busy"] == []
    assert cc_obs["shorts"] == [0, 2, 4, 6]
    if broker.name == "amqp":
        # Celery: "worker_disable_prefetch is only supported for Redis
        # brokers", and the four are prefetched (docs/compat.md).
        assert celery_obs["depth-while-busy"] == 0
        assert len(celery_obs["reserved-while-busy"]) == 4
        for label in ("depth-while-busy", "reserved-while-busy"):
            celery_obs.items = [item for item in celery_obs.items if item[0] != label]
            cc_obs.items = [item for item in cc_obs.items if item[0] != label]
    assert celery_obs == cc_obs
