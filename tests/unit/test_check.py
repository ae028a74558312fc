"""``ccworker check``: the sub-command's parsing, findings, report and exit status.

Runs of the real command go through a subprocess (booting an app for a
worker makes it the process's default app and patches task classes, which
must not leak into other tests); the command-line rules are checked
in-process without booting.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from celerycompat import check
from celerycompat.cli import parse_command_line, parse_worker_options

PROJECTS = Path(__file__).parent / "projects"


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("CELERY_", "DJANGO_SETTINGS_MODULE"))}


def ccworker(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "celerycompat", *argv], cwd=PROJECTS,
                          env=_clean_env(), capture_output=True, text=True, timeout=120)


@pytest.fixture
def projects(monkeypatch: pytest.MonkeyPatch):
    """Run inside ``projects/`` and forget the modules imported there."""
    monkeypatch.chdir(PROJECTS)
    for name in [n for n in os.environ if n.startswith("CELERY_")]:
        monkeypatch.delenv(name)
    modules, path = set(sys.modules), list(sys.path)
    yield PROJECTS
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    sys.path[:] = path


# --------------------------------------------------------------------------
# Where the word ``check`` may stand, and where it is something else


@pytest.mark.parametrize("argv", [
    ["check", "-A", "checkclean"], ["-A", "checkclean", "check"],
    ["-A", "checkclean", "check", "-l", "INFO"], ["check", "-l", "INFO", "--app=checkclean"],
])
def test_check_is_the_command(projects, argv) -> None:
    cl = parse_command_line(argv)
    assert cl.command == "check" and cl.config_args == []
    assert cl.app.main == "checkclean"


@pytest.mark.parametrize("argv", [
    ["-A", "checkclean"], ["-A", "checkclean", "worker"], ["worker", "-A", "checkclean"],
])
def test_worker_forms_unchanged(projects, argv) -> None:
    cl = parse_command_line(argv)
    assert cl.command == "worker" and cl.config_args == []


def test_a_project_named_check_is_a_project(projects) -> None:
    cl = parse_command_line(["-A", "check"])
    assert cl.command == "worker" and cl.app.main == "check"
    cl = parse_command_line(["check", "-A", "check"])
    assert cl.command == "check" and cl.app.main == "check"


def test_check_as_a_setting_is_a_setting(projects) -> None:
    cl = parse_command_line(["-A", "checkclean", "--", "check=1"])
    assert cl.command == "worker" and cl.config_args == ["check=1"]


def test_worker_options_parse_ignores_the_command_word(projects) -> None:
    assert parse_worker_options(["check", "-A", "checkclean", "-c", "3"]).concurrency == 3


# --------------------------------------------------------------------------
# The real command


def test_clean_project_exits_0() -> None:
    done = ccworker("check", "-A", "checkclean")
    assert done.returncode == 0, done.stderr
    assert "ccworker check: app 'checkclean'" in done.stdout
    assert "Nothing found that ccworker does differently" in done.stdout
    # A check starts no worker (the broker in checkclean does not exist).
    assert "ready." not in done.stdout + done.stderr


def test_everything_reported_exits_1() -> None:
    done = ccworker("-A", "checkproj", "check", "-P", "threads", "--pool-start-method", "spawn")
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    for expected in (
        "worker_consumer = 'checkproj:NotUsedConsumer'",
        "NOTE         setting   worker_soft_shutdown_timeout = 10.0",
        "NOTE         task      Request class checkproj:TimeoutAwareRequest "
        "(checkproj.custom_request)",
        "UNSUPPORTED  task      Request class checkproj:PoolRequest (checkproj.pool_request)",
        "its execute_using_pool is not called",
        "Strategy checkproj:custom_strategy (checkproj.custom_strategy_task)",
        "time limits on the threads pool (checkproj.limited)",
        "NOTE         setting   worker_lost_wait = 3.0",
        "NOTE         task      rate limits (checkproj.rated)",
        "(exit 1)",
    ):
        assert expected in out, expected
    # Custom bootsteps run as in Celery (project_steps.py): nothing to report.
    assert "bootstep" not in out


def test_eventlet_pool_runs_with_limits_enforced() -> None:
    """``-P eventlet`` is ccworker's eventlet pool: its signals are sent (not a
    finding), its time limits are enforced where Celery's ignores them."""
    done = ccworker("-A", "checkproj", "check", "-P", "eventlet")
    assert "pool: eventlet" in done.stdout, done.stdout + done.stderr
    assert "DIFFERS      task      time limits on the eventlet pool (checkproj.limited)" \
        in done.stdout
    assert "UNSUPPORTED  pool" not in done.stdout
    assert "eventlet_pool_started" not in done.stdout


def test_findings_follow_the_command_line() -> None:
    """On prefork (Celery's default) limits and eventlet signals are not findings."""
    done = ccworker("check", "-A", "checkproj")
    assert done.returncode == 1
    assert "time limits" not in done.stdout and "eventlet_pool_started" not in done.stdout
    assert "Request class checkproj:TimeoutAwareRequest" in done.stdout


def test_beat_refusal_is_reported() -> None:
    done = ccworker("check", "-A", "checkclean", "-B", "-P", "gevent")
    assert done.returncode == 1
    assert "-B option doesn't work with eventlet/gevent pools" in done.stdout


def test_disable_prefetch_is_reported() -> None:
    done = ccworker("check", "-A", "checkclean", "--disable-prefetch")
    assert done.returncode == 0, done.stdout
    assert "worker_disable_prefetch = True" in done.stdout
    assert "Celery honours it on Redis only" in done.stdout


@pytest.mark.parametrize(("argv", "message"), [
    (["check", "-A", "checkbootfail"], "No module named 'checkbootfail_missing_tasks_module'"),
    (["check", "-A", "not_a_module_anywhere"], "The module not_a_module_anywhere was not found."),
    (["check", "-A", "importerror"], "definitely_not_installed_dependency"),
])
def test_cannot_load_exits_2(argv, message) -> None:
    done = ccworker(*argv)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert done.stdout == ""


# --------------------------------------------------------------------------
# Report and status (pure)


def _options(**overrides) -> SimpleNamespace:
    app = SimpleNamespace(main="proj", tasks={"proj.a": None, "celery.chord": None})
    values = dict(app=app, pool="prefork", requested_pool="prefork", concurrency=4,
                  consume_queues=[SimpleNamespace(name="q1"), SimpleNamespace(name="q2")],
                  beat=False, scheduler=None, schedule_filename=None)
    values.update(overrides)
    return SimpleNamespace(**values)


def test_exit_status() -> None:
    note = check.Finding(check.NOTE, "task", "x", "y")
    differs = check.Finding(check.DIFFERS, "task", "x", "y")
    assert check.exit_status([]) == 0
    assert check.exit_status([note]) == 0
    assert check.exit_status([note, differs]) == 1


def test_render_orders_by_level_and_summarises() -> None:
    findings = [check.Finding(check.NOTE, "task", "n", "a note"),
                check.Finding(check.DIFFERS, "queue", "d", "differs"),
                check.Finding(check.UNSUPPORTED, "bootstep", "u", "unsupported")]
    text = check.render(findings, _options(beat=True, scheduler="s", schedule_filename="f"))
    lines = text.splitlines()
    assert lines[0].startswith("ccworker check: app 'proj' (celery ")
    assert "pool: prefork, concurrency 4; queues: q1, q2" in lines[1]
    assert "tasks: 1" in lines[2]
    assert "beat: embedded, scheduler s, schedule f" in lines[3]
    levels = [line.split()[0] for line in lines if line.split()[:1]
              and line.split()[0] in ("UNSUPPORTED", "DIFFERS", "NOTE")]
    assert levels == ["UNSUPPORTED", "DIFFERS", "NOTE"]
    assert lines[-1] == ("2 finding(s) would behave differently under ccworker, 1 note(s) "
                         "(exit 1). See docs/compat.md.")


def test_render_nothing_found() -> None:
    text = check.render([], _options(pool="threads", requested_pool="eventlet"))
    assert "pool: threads (asked for: eventlet)" in text
    assert text.endswith("Nothing found that ccworker does differently from celery worker "
                         "(exit 0).\n")
