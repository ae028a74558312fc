"""The consumer's observer seam: every hook reaches the observers that have it."""

from __future__ import annotations

from celerycompat.consumer.observers import HOOKS, Observers


class Recorder:
    def __init__(self, name, hooks, log):
        self.name = name
        for hook in hooks:
            setattr(self, hook, lambda *a, _hook=hook, **kw: log.append((self.name, _hook, a, kw)))


def test_each_hook_calls_the_observers_that_have_it_in_order():
    log: list = []
    events = Recorder("events", ["received", "started", "finished", "revoked"], log)
    metrics = Recorder("metrics", ["received", "finished", "revoked", "turned", "connected"], log)
    observers = Observers([events, None, metrics])
    observers.received("r")
    observers.started("r")
    observers.finished("r", "outcome", "ack")
    observers.revoked("r", terminated=True, signum=15, expired=False)
    observers.turned()
    observers.cancelled("r")  # nobody has it: a no-op
    assert log == [
        ("events", "received", ("r",), {}), ("metrics", "received", ("r",), {}),
        ("events", "started", ("r",), {}),
        ("events", "finished", ("r", "outcome", "ack"), {}),
        ("metrics", "finished", ("r", "outcome", "ack"), {}),
        ("events", "revoked", ("r",), {"terminated": True, "signum": 15, "expired": False}),
        ("metrics", "revoked", ("r",), {"terminated": True, "signum": 15, "expired": False}),
        ("metrics", "turned", (), {}),
    ]


def test_an_observer_added_later_hears_from_then_on():
    log: list = []
    observers = Observers()
    for hook in HOOKS:
        assert callable(getattr(observers, hook))
    observers.turned()
    scaler = Recorder("autoscaler", ["turned", "received"], log)
    observers.add(scaler)
    observers.add(scaler)  # once only
    observers.turned()
    observers.received("r")
    assert log == [("autoscaler", "turned", (), {}), ("autoscaler", "received", ("r",), {})]


def test_the_real_parts_take_the_hook_signatures():
    """Every part on the seam implements its hooks as the consumer calls them
    (a signature mismatch would only show at run time)."""
    import inspect

    from celerycompat.consumer.autoscale import Autoscaler
    from celerycompat.consumer.delayed_delivery import NativeDelayedDelivery
    from celerycompat.consumer.project_requests import ProjectRequests
    from celerycompat.control.gossip import Gossip
    from celerycompat.events.task_events import TaskEvents
    from celerycompat.observability.worker_metrics import WorkerMetrics
    from celerycompat.project_steps import StepRunner

    calls = {
        "connected": (("broker",), {}), "disconnected": ((), {}), "turned": ((), {}),
        "ticked": ((), {}), "closed": ((), {}), "received": (("r",), {}),
        "started": (("r",), {}), "finished": (("r", "o", "d"), {}),
        "revoked": (("r",), {"terminated": False, "signum": None, "expired": False}),
        "cancelled": (("r",), {}), "unknown": (("id", "name"), {}),
    }
    assert set(calls) == set(HOOKS)
    parts = (TaskEvents, WorkerMetrics, Autoscaler, NativeDelayedDelivery, ProjectRequests,
             Gossip, StepRunner)
    for part in parts:
        for hook in HOOKS:
            method = getattr(part, hook, None)
            if method is None:
                continue
            args, kwargs = calls[hook]
            inspect.signature(method).bind(None, *args, **kwargs)
