"""A Django-side client (another process of the same project, e.g. a web view).

``python -m djproj_extras.client`` with the worker's ``CC_TEST_*``
variables: sends tasks to the worker's queue, reads their results through
``AsyncResult`` (the ``django-db`` backend: the rows the worker wrote) and
prints what it saw as one JSON document.
"""

import json
import os
import sys

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "djproj_extras.settings")
django.setup()

from django_celery_results.models import TaskResult  # noqa: E402

from djproj_extras.celery import app  # noqa: E402


def row(task_id):
    result = TaskResult.objects.get(task_id=task_id)
    return {
        "status": result.status,
        "result": result.result,
        "content_type": result.content_type,
        "task_name": result.task_name,
        "task_args": result.task_args,
        "task_kwargs": result.task_kwargs,
        "worker": result.worker,
        "traceback_last_line": (result.traceback or "").strip().splitlines()[-1:],
        "meta": result.meta,
        "done": result.date_done is not None,
    }


def main():
    timeout = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    ok = app.send_task("djproj_extras.probes.tasks.add", (2, 3))
    bad = app.send_task("djproj_extras.probes.tasks.fail", ("boom",))
    seen = {"add": ok.get(timeout=timeout), "add_state": ok.state}
    try:
        bad.get(timeout=timeout)
    except ValueError as exc:
        seen["fail"] = {"type": type(exc).__name__, "args": list(exc.args)}
    seen["fail_state"] = bad.state
    seen["rows"] = {"add": row(ok.id), "fail": row(bad.id)}
    seen["ids"] = [ok.id, bad.id]
    print(json.dumps(seen, sort_keys=True))


if __name__ == "__main__":
    main()
