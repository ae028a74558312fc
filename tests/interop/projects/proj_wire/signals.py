"""The task signals whose firing (and order) a wire scenario can change.

Retries, rejections, revocations and failures each take their own path
through the worker; recording which signals fire, for which id, shows a
path taken differently even when the stored result happens to agree.
"""

from celery import signals

from ccit_recorder import record


def _exc(exc):
    return None if exc is None else f"{type(exc).__name__}"


@signals.worker_ready.connect
def _ready(sender=None, **kwargs):
    # The harness waits (up to 5 s) for this record after ``ready.`` before
    # it hands the worker to a scenario.
    record("worker_ready")


@signals.task_prerun.connect
def _prerun(sender=None, task_id=None, task=None, **kwargs):
    record("task_prerun", id=task_id, name=getattr(task, "name", None),
           retries=getattr(getattr(task, "request", None), "retries", None))


@signals.task_postrun.connect
def _postrun(sender=None, task_id=None, task=None, state=None, **kwargs):
    record("task_postrun", id=task_id, state=state)


@signals.task_success.connect
def _success(sender=None, **kwargs):
    record("task_success", id=sender.request.id)


@signals.task_retry.connect
def _retry(sender=None, request=None, reason=None, **kwargs):
    record("task_retry", id=getattr(request, "id", None), reason=_exc(reason))


@signals.task_failure.connect
def _failure(sender=None, task_id=None, exception=None, **kwargs):
    record("task_failure", id=task_id, exception=_exc(exception))


@signals.task_revoked.connect
def _revoked(sender=None, request=None, terminated=None, signum=None, expired=None,
             **kwargs):
    record("task_revoked", id=getattr(request, "id", None), terminated=terminated,
           signum=signum, expired=expired)


@signals.task_rejected.connect
def _rejected(sender=None, message=None, exc=None, **kwargs):
    record("task_rejected", exc=_exc(exc))
