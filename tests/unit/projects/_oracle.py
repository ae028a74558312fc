"""Run command lines through real ``celery worker`` and through ccworker.

Used by ``tests/unit/test_cli.py`` in a subprocess (``python _oracle.py``
with a JSON list of cases on stdin, run from this directory). For Celery,
the app's ``Worker`` is replaced by a recorder that keeps the keywords the
CLI passes and runs Celery's own ``WorkController.setup_defaults`` on them,
so nothing connects anywhere. Modules and environment are reset between
the two sides and between cases. Prints one JSON list of
``{"celery": ..., "ours": ...}``.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.getcwd())

from celery.bin.celery import celery as celery_command  # noqa: E402
from celery.worker.worker import WorkController  # noqa: E402

from celerycompat.cli import parse_worker_options  # noqa: E402
from celerycompat.options import pool_alias  # noqa: E402

RESOLVED = ("concurrency", "task_events", "time_limit", "soft_time_limit",
            "max_tasks_per_child", "max_memory_per_child", "prefetch_multiplier",
            "statedb", "schedule_filename", "scheduler", "pool_start_method",
            "optimization", "loglevel", "logfile")


def _plain(value):
    if isinstance(value, type):
        return pool_alias(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def run_celery(argv):
    recorded = {}

    class Recorder:
        def __init__(self, **kwargs):
            app = kwargs.pop("app", None) or recorded["app"]
            recorded["kwargs"] = {k: _plain(v) for k, v in kwargs.items()}
            probe = WorkController.__new__(WorkController)
            probe.app = app
            WorkController.setup_defaults(probe, **kwargs)
            recorded["resolved"] = {k: _plain(getattr(probe, k)) for k in RESOLVED}
            recorded["resolved"]["pool"] = _plain(probe.pool_cls)
            recorded["conf"] = {
                "worker_prefetch_multiplier": app.conf.worker_prefetch_multiplier,
                "worker_disable_prefetch": app.conf.worker_disable_prefetch,
                "task_default_queue": app.conf.task_default_queue,
                "broker_url": app.conf.broker_url,
                "result_backend": app.conf.result_backend,
            }
            self.exitcode = 0

        def start(self):
            pass

    from celery import Celery

    original = Celery.Worker

    def worker_property(app):
        recorded["app"] = app
        return Recorder

    Celery.Worker = property(worker_property)
    try:
        celery_command.main(args=argv, standalone_mode=False, auto_envvar_prefix="CELERY")
    except SystemExit as exc:  # pragma: no cover - only on errors
        recorded["exit"] = exc.code
    except Exception as exc:
        recorded["error"] = type(exc).__name__
    finally:
        Celery.Worker = original
    recorded.pop("app", None)
    return recorded


def run_ours(argv):
    try:
        options = parse_worker_options(argv)
    except Exception as exc:
        return {"error": type(exc).__name__}
    app = options.app
    fields = {k: _plain(getattr(options, k)) for k in RESOLVED}
    fields["pool"] = options.requested_pool
    return {
        "kwargs": {k: _plain(v) for k, v in options.celery_kwargs.items()},
        "resolved": fields,
        "conf": {
            "worker_prefetch_multiplier": app.conf.worker_prefetch_multiplier,
            "worker_disable_prefetch": app.conf.worker_disable_prefetch,
            "task_default_queue": app.conf.task_default_queue,
            "broker_url": app.conf.broker_url,
            "result_backend": app.conf.result_backend,
        },
    }


def isolated(fn, case):
    modules = set(sys.modules)
    environ = dict(os.environ)
    cwd = os.getcwd()
    os.environ.update(case.get("env", {}))
    try:
        return fn(case["argv"])
    finally:
        for name in set(sys.modules) - modules:
            del sys.modules[name]
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)


def main():
    cases = json.load(sys.stdin)
    results = [{"celery": isolated(run_celery, case), "ours": isolated(run_ours, case)}
               for case in cases]
    json.dump(results, sys.stdout, default=repr)


if __name__ == "__main__":
    main()
