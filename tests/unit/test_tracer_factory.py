"""Tracers built through ``celery.app.trace.build_tracer`` (execution/tracer.py).

An instrumentation here is what sentry-sdk's Celery integration does (see
``tests/interop/test_integrations.py`` for the real one): replace
``build_tracer`` with a function that patches the task's ``run`` and wraps
the tracer the replaced function returns.
"""

from __future__ import annotations

from types import SimpleNamespace

import celery.app.trace as celery_trace
import pytest
from celery import Celery

from celerycompat.execution import tracer


@pytest.fixture
def pristine(monkeypatch):
    """``build_tracer`` as Celery ships it, restored after the test."""
    monkeypatch.setattr(celery_trace, "build_tracer", tracer._celery_build_tracer)
    yield


@pytest.fixture
def app():
    app = Celery("tracerunit", broker="memory://", backend="cache+memory://",
                 set_as_current=False)

    @app.task(name="tracerunit.double", shared=False)
    def double(x):
        return x * 2

    app.finalize()
    yield app
    app.close()


def instrument(calls: list) -> None:
    """Install a Sentry-like wrapper over whatever ``build_tracer`` is now."""
    original = celery_trace.build_tracer

    def instrumented_build_tracer(name, task, *args, **kwargs):
        run = task.run

        def patched_run(*a, **kw):
            calls.append("body")
            return run(*a, **kw)

        task.run = patched_run
        built = original(name, task, *args, **kwargs)

        def wrapped(uuid, args, kwargs, request=None):
            calls.append(("enter", uuid, list(args), request.get("marker")))
            try:
                return built(uuid, args, kwargs, request)
            finally:
                calls.append("exit")

        return wrapped

    celery_trace.build_tracer = instrumented_build_tracer


def message(task_id: str, args: tuple) -> SimpleNamespace:
    return SimpleNamespace(id=task_id, args=args, kwargs={})


def run_once(app, calls: list, task_id: str = "t1"):
    task = app.tasks["tracerunit.double"]

    def trace(task, message, context, started):
        calls.append(("trace", message.id, context, started))
        # The runner looks the body up now: the patched one.
        return task.run(*message.args)

    tracers = tracer.Tracers(app, "node@host")
    return tracers.run(task, trace, message(task_id, (21,)), {"marker": "m"}, "ctx", 1.5)


def test_instrumentation_wraps_our_tracer(pristine, app) -> None:
    assert tracer.install() is True
    calls: list = []
    instrument(calls)
    assert run_once(app, calls) == 42
    assert calls == [("enter", "t1", [21], "m"), ("trace", "t1", "ctx", 1.5), "body", "exit"]


def test_tracer_built_once_per_task_type(pristine, app) -> None:
    tracer.install()
    builds: list = []
    original = celery_trace.build_tracer

    def counting(name, task, *args, **kwargs):
        builds.append(name)
        return original(name, task, *args, **kwargs)

    celery_trace.build_tracer = counting
    task = app.tasks["tracerunit.double"]
    tracers = tracer.Tracers(app, "node@host")
    for n in range(3):
        tracers.run(task, lambda t, m, c, s: m.args[0], message(f"t{n}", (n,)), {}, None, 0.0)
    assert builds == ["tracerunit.double"]


def test_factory_is_celerys_own_for_everyone_else(pristine, app) -> None:
    """Eager runs (``Task.apply``) build Celery's tracer through the factory."""
    tracer.install()
    assert tracer.install() is True  # idempotent
    assert celery_trace.build_tracer is tracer._factory
    result = app.tasks["tracerunit.double"].apply((4,))
    assert result.get() == 8


def test_replaced_before_install_keeps_task_patches(pristine, app) -> None:
    """An agent that replaced ``build_tracer`` before ccworker: its task patch
    applies, its tracer (which would run Celery's) is not used."""
    calls: list = []
    instrument(calls)
    assert tracer.install() is False
    assert run_once(app, calls) == 42
    assert calls == [("trace", "t1", "ctx", 1.5), "body"]


def test_failing_build_runs_the_task_anyway(pristine, app, caplog) -> None:
    tracer.install()

    def broken(name, task, *args, **kwargs):
        raise RuntimeError("instrumentation bug")

    celery_trace.build_tracer = broken
    calls: list = []
    assert run_once(app, calls) == 42
    assert "instrumentation bug" in caplog.text
