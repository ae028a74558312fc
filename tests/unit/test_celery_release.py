"""What ccworker does on a Celery release that lacks a newer setting or helper."""

from __future__ import annotations

import pytest
from celery import Celery
from celery.app import defaults

from celerycompat import celery_release as release


@pytest.mark.parametrize("text, expected", [
    ("5.2.7", (5, 2, 7)), ("5.5.0rc4", (5, 5, 0)), ("5.6.0b1", (5, 6, 0)), ("6.0", (6, 0)),
])
def test_parse_version(text, expected):
    assert release.parse_version(text) == expected


def test_a_defined_setting_is_read_from_the_app():
    app = Celery("defined", set_as_current=False)
    app.conf.worker_disable_prefetch = True
    assert release.setting(app.conf, "worker_disable_prefetch") is True


@pytest.mark.parametrize("name", sorted(release.BEFORE_SETTING))
def test_a_setting_the_release_lacks_is_that_release_behaviour(name, monkeypatch):
    """As on Celery 5.2: the name is not in its defaults, and what the project
    wrote under it does not count (that release's worker never reads it)."""
    app = Celery("older", set_as_current=False)
    app.conf[name] = "written by the project"
    monkeypatch.delitem(defaults.DEFAULTS, name, raising=False)
    assert release.setting(app.conf, name) == release.BEFORE_SETTING[name][0]


def test_every_setting_newer_than_the_oldest_release_is_listed():
    """A setting ccworker reads through ``setting`` must be known to it."""
    with pytest.raises(KeyError):
        release.setting(Celery("x", set_as_current=False).conf, "no_such_setting_anywhere")


@pytest.mark.parametrize("version, warns", [
    ((5, 1, 2), True), ((5, 2, 0), False), ((5, 7, 3), False), ((5, 8, 0), True), ((6, 0), True),
])
def test_support_warning_outside_the_tested_minors(version, warns):
    line = release.support_warning(version)
    assert (line is not None) == warns
    if warns:
        assert "outside the releases ccworker is tested with" in line


def test_ignore_result_without_the_helper_reads_the_task_only():
    class Task:
        ignore_result = False

    class Request:
        ignore_result = True

    assert release._task_ignore_result(Task(), Request()) is False


def test_a_flag_the_release_lacks_is_not_offered(monkeypatch):
    """Celery 5.2's ``celery worker`` has neither flag: ccworker under it
    neither accepts them nor hands them to ``celeryd_init``."""
    from celerycompat import cli_params

    older = release.worker_option_names() - {"disable_prefetch", "pool_start_method"}
    monkeypatch.setattr(cli_params, "worker_option_names", lambda: older)
    names = {param.name for param in cli_params.worker_params()}
    assert "disable_prefetch" not in names and "pool_start_method" not in names
    assert "concurrency" in names


@pytest.mark.parametrize("version, sender, redelivered", [
    ((5, 2, 7), None, None), ((5, 3, 6), None, False), ((5, 6, 3), None, False),
    ((5, 7, 0), "w@h", False),
])
def test_per_release_values(monkeypatch, version, sender, redelivered):
    monkeypatch.setattr(release, "celery_version", lambda: version)
    assert release.process_init_sender("w@h") == sender
    assert release.redelivered_default() is redelivered


@pytest.mark.parametrize("version, revoke, replies57, replies53, reject_fails, stamps", [
    ((5, 2, 7), None, False, False, False, "none"),
    ((5, 3, 6), None, False, True, False, "all"),
    ((5, 5, 3), None, False, True, False, "all"),
    ((5, 6, 3), "every id", False, True, False, "all"),
    ((5, 7, 0), "not started", True, True, True, "named"),
])
def test_per_release_rules(monkeypatch, version, revoke, replies57, replies53, reject_fails,
                           stamps):
    """Each rule the 5.2-5.6 matrix found, as the release's own source has it."""
    monkeypatch.setattr(release, "celery_version", lambda: version)
    assert release.revoke_stores() == revoke
    assert release.control_replies_are_57() is replies57
    assert release.control_replies_are_53() is replies53
    assert release.reject_fails_task() is reject_fails
    assert release.result_stamps() == stamps


@pytest.mark.parametrize("version, aware", [((5, 3, 6), False), ((5, 4, 0), True),
                                             ((5, 7, 0), True)])
def test_date_done_is_naive_before_54(monkeypatch, version, aware):
    """``date_done`` before 5.4 is ``datetime.utcnow().isoformat()``: no offset."""
    from celery import Celery

    monkeypatch.setattr(release, "celery_version", lambda: version)
    stamp = release.result_clock(Celery(set_as_current=False))().isoformat()
    assert stamp.endswith("+00:00") is aware


@pytest.mark.parametrize("zone", ["UTC", "Europe/Berlin", "America/New_York",
                                  "Australia/Lord_Howe", "Asia/Kathmandu"])
def test_date_done_clock_since_55_is_app_now(monkeypatch, zone):
    """The 5.5+ clock is ``app.now()``'s value in the app's timezone, offset
    and zone object included; a subclass's own ``now`` is the one called."""
    from datetime import timedelta

    from celery import Celery

    monkeypatch.setattr(release, "celery_version", lambda: (5, 7, 0))
    app = Celery(set_as_current=False)
    app.conf.timezone = zone
    clock = release.result_clock(app)
    before, ours, after = app.now(), clock(), app.now()
    assert before <= ours <= after and after - before < timedelta(seconds=5)
    assert ours.tzinfo is before.tzinfo and ours.utcoffset() == before.utcoffset()
    assert ours.isoformat()[-6:] == before.isoformat()[-6:]

    class Frozen(Celery):
        def now(self):
            return "frozen"

    assert release.result_clock(Frozen(set_as_current=False))() == "frozen"
    app.now = lambda: "patched"
    assert release.result_clock(app)() == "patched"


def test_extended_meta_stamps_by_release():
    """5.3-5.6 copy every stamp of the request into an extended result; 5.7
    only those named in ``stamped_headers``; 5.2 none."""
    from datetime import datetime
    from types import SimpleNamespace

    from celerycompat.protocol.results import result_meta

    request = SimpleNamespace(task="t", args=[], kwargs={}, hostname="w", retries=0,
                              delivery_info={"routing_key": "q"}, children=[],
                              stamps={"a": 1, "b": 2}, stamped_headers=["a"])

    def meta(stamps):
        return result_meta(1, "SUCCESS", None, request, now=datetime.now, extended=True,
                           children=None, stamps=stamps)
    assert ("a" in meta("named"), "b" in meta("named")) == (True, False)
    assert ("a" in meta("all"), "b" in meta("all")) == (True, True)
    assert "stamped_headers" not in meta("none") and "a" not in meta("none")
