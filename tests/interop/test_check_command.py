"""``ccworker check`` on the interop projects, as a CI job runs it before a migration.

The real command in a subprocess, from the projects directory, configured
like the interop workers. ccworker only: ``celery`` has no such command.
What matters here is that the check loads real projects the way the worker
does (a Django project with autodiscovery, a package with a ``celery``
module), reports what concerns them, exits with the documented status, and
never touches the broker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]


def run_check(*argv: str, env: dict | None = None, tmp=None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("CELERY_", "CC_TEST_", "PYTHONPATH", "DJANGO_SETTINGS_MODULE"))}
    base.update({"CC_TEST_BROKER": harness.redis_db_url(harness.BROKER_DB),
                 "CC_TEST_BACKEND": harness.redis_db_url(harness.RESULT_DB),
                 "CC_TEST_QUEUE": f"ccit.check.{harness.new_token()}"})
    if tmp is not None:
        base["CC_TEST_DJANGO_DIR"] = str(tmp)
    base.update(env or {})
    return subprocess.run([sys.executable, "-m", "celerycompat", *argv],
                          cwd=str(harness.PROJECTS_DIR), env=base, capture_output=True,
                          text=True, timeout=120)


def test_django_project_with_beat_nothing_to_report(tmp_path):
    """A Django project (autodiscovered ``shared_task``s, django-celery-beat and
    django-celery-results installed), checked with the flags it runs with."""
    done = run_check("check", "-A", "djproj_extras", "-P", "threads", "-c", "4", "-B",
                     "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler",
                     tmp=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "ccworker check: app 'djproj_extras'" in out
    assert re.search(r"pool: threads, concurrency 4; queues: ccit\.check\.", out), out
    # Autodiscovery ran: the probes app's four tasks were found.
    assert "tasks: 4" in out, out
    assert "beat: embedded, scheduler django_celery_beat.schedulers:DatabaseScheduler" in out
    assert out.rstrip().endswith("(exit 0).")


def test_async_tasks_are_listed_with_the_routing_they_need():
    """``proj_async``'s ``async def`` tasks: a Celery worker cannot run them."""
    done = run_check("-A", "proj_async", "check", "-P", "threads")
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"DIFFERS +task +async def tasks \(proj_async\.tasks\.add, "
                     r"proj_async\.tasks\.autoretried, ", done.stdout), done.stdout
    assert "Route them to queues only ccworkers consume" in done.stdout
    done = run_check("-A", "proj_async", "check", "-P", "gevent")
    assert re.search(r"UNSUPPORTED +task +async def tasks on the gevent pool", done.stdout), \
        done.stdout


def test_time_limits_on_threads_exit_1():
    """``proj_timelimits`` on the threads pool: its limits would now be enforced."""
    done = run_check("-A", "proj_timelimits", "check", "-P", "threads")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "DIFFERS      task      time limits on the threads pool (" in done.stdout
    # The same project on prefork (Celery's default): nothing differs.
    done = run_check("-A", "proj_timelimits", "check")
    assert done.returncode == 0, done.stdout + done.stderr


def test_eventlet_pool_is_not_a_finding():
    """``-P eventlet`` runs ccworker's eventlet pool (pools/eventlet_pool.py)."""
    done = run_check("check", "-A", "proj_ops", "-P", "eventlet", "-D")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pool: eventlet" in done.stdout and "UNSUPPORTED" not in done.stdout
    # -D is done now (celerycompat/daemon.py): not a finding, and the check
    # itself never detaches.
    assert "detach" not in done.stdout


def test_never_connects():
    """A broker that does not exist changes nothing: the check reads the
    project, it does not start a worker."""
    done = run_check("check", "-A", "proj_ops", "-b", "redis://127.0.0.1:1/0")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ready." not in done.stdout + done.stderr
    assert "Cannot connect" not in done.stdout + done.stderr


def test_unloadable_project_exit_2():
    done = run_check("check", "-A", "proj_that_does_not_exist")
    assert done.returncode == 2
    assert "The module proj_that_does_not_exist was not found." in done.stderr
