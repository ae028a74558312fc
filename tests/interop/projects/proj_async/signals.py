"""Task signal receivers: their order around an ``async def`` body is Celery's."""

from celery import signals

from ccit_recorder import record as _record

#: The harness's probe, and the tasks test_terminate's scenario records itself.
UNRECORDED = ("proj_async.tasks.noop", "proj_async.tasks.sleep", "proj_async.tasks.barrier",
              "proj_async.tasks.gated")


def record(event, name, **detail):
    if name not in UNRECORDED:
        _record(event, name=name, **detail)


@signals.task_prerun.connect
def on_task_prerun(sender=None, task_id=None, **kwargs):
    record("task_prerun", sender.name, id=task_id)


@signals.task_success.connect
def on_task_success(sender=None, result=None, **kwargs):
    record("task_success", sender.name, id=sender.request.id, result=result)


@signals.task_failure.connect
def on_task_failure(sender=None, task_id=None, exception=None, **kwargs):
    record("task_failure", sender.name, id=task_id, exc=type(exception).__name__)


@signals.task_retry.connect
def on_task_retry(sender=None, request=None, reason=None, **kwargs):
    record("task_retry", sender.name, id=request.id)


@signals.task_postrun.connect
def on_task_postrun(sender=None, task_id=None, state=None, **kwargs):
    record("task_postrun", sender.name, id=task_id, state=state)
