"""``-B``: when Celery refuses it, the flag parsing, and the embedded service's stop.

The differential tests (``tests/interop/test_beat.py``) run the schedule
against ``celery worker -B``; these cover the rules and the stop path on
their own, with Celery's real beat service on an in-memory broker.
"""

from __future__ import annotations

import os
import shelve
import time
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from celery import Celery, signals
from celery.beat import PersistentScheduler
from celery.worker.components import ERR_B_GREEN

from celerycompat import beat
from celerycompat.cli import parse_worker_options

PROJECTS = Path(__file__).parent / "projects"


def options(requested_pool: str, with_beat: bool = True) -> SimpleNamespace:
    return SimpleNamespace(beat=with_beat, requested_pool=requested_pool)


@pytest.mark.parametrize("pool", ["gevent", "eventlet", "celery.concurrency.gevent:TaskPool",
                                  "mypkg.eventlet.TaskPool"])
def test_refused_next_to_green_pools(pool) -> None:
    assert beat.refusal(options(pool)) == ERR_B_GREEN


@pytest.mark.parametrize("pool", ["prefork", "processes", "solo", "threads",
                                  "mypkg.pools:TaskPool", "mypkg.gevent_pool:TaskPool"])
def test_allowed_with_other_pools(pool) -> None:
    # Celery looks at the module's last characters only: ``gevent_pool`` is fine.
    assert beat.refusal(options(pool)) is None


def test_custom_pool_is_the_class_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("CELERY_CUSTOM_WORKER_POOL", "mypkg.gevent:Pool")
    assert beat.refusal(options("custom")) == ERR_B_GREEN
    monkeypatch.setenv("CELERY_CUSTOM_WORKER_POOL", "mypkg.pool:Pool")
    assert beat.refusal(options("custom")) is None


def test_nothing_to_refuse_without_beat() -> None:
    assert beat.refusal(options("gevent", with_beat=False)) is None


@pytest.fixture
def in_projects(monkeypatch):
    monkeypatch.chdir(PROJECTS)
    for name in [n for n in os.environ if n.startswith("CELERY_")]:
        monkeypatch.delenv(name)


def test_beat_flags_are_no_longer_unsupported(in_projects) -> None:
    o = parse_worker_options(["-A", "plainmod", "-B", "-s", "/tmp/sched", "--scheduler",
                              "celery.beat:Scheduler"])
    assert (o.beat, o.schedule_filename, o.scheduler) == (True, "/tmp/sched",
                                                          "celery.beat:Scheduler")
    assert not any("beat" in line or "schedule" in line for line in o.unsupported)


def test_beat_flag_refused_on_windows(in_projects, monkeypatch) -> None:
    import celery.platforms

    monkeypatch.setattr(celery.platforms, "IS_WINDOWS", True)
    with pytest.raises(click.BadParameter, match="-B option does not work on Windows"):
        parse_worker_options(["-A", "plainmod", "-B"])
    # Without -B nothing is refused.
    assert parse_worker_options(["-A", "plainmod"]).beat is False


def test_no_service_without_beat() -> None:
    assert beat.start_embedded_beat(SimpleNamespace(beat=False)) is None


def test_stop_saves_the_schedule_and_ends_the_child(tmp_path) -> None:
    """Celery's service in its child process, stopped as the worker stops it:
    the shelve holds the schedule's entries, the child is gone; a second
    stop does nothing."""
    app = Celery("beatunit", broker="memory://", set_as_current=False)
    app.conf.beat_schedule = {"every-second": {"task": "beatunit.noop", "schedule": 1.0}}
    filename = str(tmp_path / "schedule")
    ticked = tmp_path / "ticked"

    def first_send(**_: object) -> None:  # runs in the forked child
        ticked.touch()

    # The child's scheduler has merged the entries into its shelve once it
    # sends its first task. Waiting for the file alone was a race: under CI
    # load the stop could come between the shelve's creation and the merge,
    # and the child then saved an empty schedule.
    signals.before_task_publish.connect(first_send, weak=False)
    service = beat.EmbeddedBeat(app, filename, "celery.beat:PersistentScheduler")
    try:
        service.start()
        pid = service.pid
        assert pid and pid != os.getpid()
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and not ticked.exists():
                time.sleep(0.05)
            assert ticked.exists(), "the embedded beat never sent its first task"
        finally:
            service.stop(timeout=20)
    finally:
        signals.before_task_publish.disconnect(first_send)
    service.stop()
    assert service.service is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with shelve.open(filename, flag="r") as schedule:
        assert "every-second" in schedule["entries"]


class SwallowingScheduler(PersistentScheduler):
    """Loses the first stop request, as a SIGTERM landing in a finalizer
    (``__del__``) is lost: Python prints the SystemExit and goes on."""

    swallowed = False

    def tick(self, *args, **kwargs):
        try:
            time.sleep(0.2)
        except SystemExit:
            if type(self).swallowed:
                raise
            type(self).swallowed = True
        return 0  # no sleep in the service loop: signals land in the sleep above


def test_a_lost_stop_request_is_repeated(tmp_path) -> None:
    """Celery's worker would wait for such a child forever; ccworker asks
    again (SIGINT) and the child still saves its schedule and exits 0."""
    app = Celery("beatunit2", broker="memory://", set_as_current=False)
    app.conf.beat_schedule = {"every-second": {"task": "beatunit.noop", "schedule": 1.0}}
    filename = str(tmp_path / "schedule")
    service = beat.EmbeddedBeat(app, filename, SwallowingScheduler)
    service.start()
    process = service.service
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not list(tmp_path.glob("schedule*")):
        time.sleep(0.05)
    time.sleep(0.3)  # in the loop, where the SIGTERM is lost
    service.stop(timeout=30)
    assert not process.is_alive()
    assert process.exitcode == 0  # stopped by request, not killed
    with shelve.open(filename, flag="r") as schedule:
        assert "every-second" in schedule["entries"]
