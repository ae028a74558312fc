"""``-A`` resolution and the worker-side boot of the app.

Each ``-A`` form is checked against Celery's own ``find_app`` on the same
fixture project (``projects/``). Booting (task imports, Django setup,
signals) changes process-wide state, so those tests run in a fresh Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from celery.app.utils import find_app as celery_find_app

from celerycompat import apploader

PROJECTS = Path(__file__).parent / "projects"


@pytest.fixture
def projects(monkeypatch: pytest.MonkeyPatch):
    """Run inside ``projects/`` and forget the modules imported meanwhile."""
    monkeypatch.chdir(PROJECTS)
    modules, path = set(sys.modules), list(sys.path)
    yield PROJECTS
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    sys.path[:] = path


@pytest.mark.parametrize(("spec", "main"), [
    ("plainmod", "plainmod"),
    ("plainmod:app", "plainmod"),
    ("plainmod.app", "plainmod"),
    ("celeryattr", "celeryattr"),
    ("anyname", "anyname"),
    ("attrproj", "attrproj-first"),
    ("attrproj:second", "attrproj-second"),
    ("attrproj.second", "attrproj-second"),
    ("pkgproj", "pkgproj"),
    ("pkgproj.celery", "pkgproj"),
    ("pkgproj.celery:app", "pkgproj"),
    ("nestpkg.inner", "nestpkg.inner"),
])
def test_app_forms_match_celery(projects, spec: str, main: str) -> None:
    ours = apploader.load_app(spec)
    theirs = celery_find_app(spec)
    assert ours is theirs
    assert ours.main == main


def test_cwd_is_on_path_only_while_importing(projects) -> None:
    cwd = os.getcwd()
    while cwd in sys.path:
        sys.path.remove(cwd)
    apploader.load_app("plainmod")
    assert cwd not in sys.path


def test_workdir(projects, tmp_path) -> None:
    (tmp_path / "wdmod.py").write_text(
        "from celery import Celery\napp = Celery('wdmod', set_as_current=False)\n")
    assert apploader.load_app("wdmod", workdir=str(tmp_path)).main == "wdmod"
    assert os.getcwd() == str(tmp_path)


def test_no_spec_is_current_app(projects) -> None:
    from celery import current_app

    assert apploader.load_app(None) is current_app._get_current_object()


@pytest.mark.parametrize(("spec", "error"), [
    ("noapp", AttributeError),
    ("does_not_exist_anywhere", ModuleNotFoundError),
    ("importerror", ModuleNotFoundError),
    # Celery retries a missing attribute as a module name, even after ":".
    ("attrproj:missing", ModuleNotFoundError),
])
def test_errors_match_celery(projects, spec: str, error: type) -> None:
    with pytest.raises(error) as theirs:
        celery_find_app(spec)
    with pytest.raises(error) as ours:
        apploader.load_app(spec)
    assert type(ours.value) is type(theirs.value)


def test_not_an_app(projects) -> None:
    with pytest.raises(apploader.AppNotFound):
        apploader.load_app("attrproj:not_an_app")


def test_broken_celery_submodule_is_reported(projects) -> None:
    """Celery swallows the ImportError of ``brokenpkg.celery``; we say why."""
    with pytest.raises(AttributeError, match="missing_dependency_of_brokenpkg"):
        apploader.load_app("brokenpkg")


# --------------------------------------------------------------------------
# Booting (fresh process each)

BOOT_SNIPPET = """
import json, sys
from celery import signals
from celerycompat.cli import build_worker_options
order = []
for name in ("import_modules", "celeryd_init", "worker_init"):
    getattr(signals, name).connect(
        lambda sender=None, _n=name, **kw: order.append(_n), weak=False)
options = build_worker_options(sys.argv[1:], boot=True)
app = options.app
out = {
    "order": order,
    "finalized": app.finalized,
    "tasks": sorted(t for t in app.tasks if not t.startswith("celery.")),
    "include": sorted(app.conf.include),
    "prefetch": options.prefetch_multiplier,
    "time_limit": options.time_limit,
    "queue": app.conf.task_default_queue,
    "current": __import__("celery").current_app.main,
}
try:
    from django.apps import apps
    out["django_ready"] = apps.ready
    out["task_class"] = type(app.tasks["djapp.tasks.mul"]).__mro__[1].__module__
except Exception:
    pass
print(json.dumps(out))
"""


def boot(*argv: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "DJANGO_SETTINGS_MODULE"))}
    done = subprocess.run([sys.executable, "-c", BOOT_SNIPPET, *argv], cwd=PROJECTS,
                          text=True, capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_boot_imports_task_modules_and_includes() -> None:
    out = boot("-A", "pkgproj", "-I", "pkgproj.extra")
    assert out["order"] == ["import_modules", "celeryd_init", "worker_init"]
    assert out["finalized"] is True
    assert out["tasks"] == ["pkgproj.celery.ping", "pkgproj.extra.extra", "pkgproj.jobs.job"]
    # every module defining a loaded task, Celery's built-ins included
    assert out["include"] == ["celery.app.builtins", "pkgproj.celery", "pkgproj.extra",
                              "pkgproj.jobs"]
    assert out["current"] == "pkgproj"


def test_boot_django_project() -> None:
    out = boot("-A", "djproj", "worker", "-l", "info")
    assert out["django_ready"] is True
    assert "djapp.tasks.mul" in out["tasks"]
    # settings read through the CELERY_ namespace
    assert (out["prefetch"], out["time_limit"], out["queue"]) == (2, 60.0, "djqueue")
    # the Django fixup's task class, as under ``celery worker``
    assert out["task_class"] == "celery.contrib.django.task"
    assert out["order"][0] == "import_modules"
