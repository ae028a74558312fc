"""Signal receivers the project connects, recording the order they fire.

A drop-in worker must send the signals a project relies on, with the same
arguments, in the same order relative to each other and to the task's hooks
(``before_start``, ``on_success``...). Each receiver records the signal name
and a few details that mean the same thing on both workers: node names,
task names, ids, states, exception types. Objects that are implementation
details (the ``Consumer``, the ``WorkController``) are reduced to the
attribute a project would read from them.
"""

from celery import signals

from ccit_recorder import record


def _name(task):
    return getattr(task, "name", None)


@signals.celeryd_init.connect
def on_celeryd_init(sender=None, instance=None, conf=None, options=None, **kwargs):
    record(
        "celeryd_init",
        sender=sender,
        has_instance=instance is not None,
        queue=getattr(conf, "task_default_queue", None),
        options_keys=sorted(options or {}),
    )


@signals.worker_init.connect
def on_worker_init(sender=None, **kwargs):
    record("worker_init", hostname=getattr(sender, "hostname", None))


@signals.worker_process_init.connect
def on_worker_process_init(sender=None, **kwargs):
    record("worker_process_init", sender=sender)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    record("worker_ready", hostname=getattr(sender, "hostname", None))


@signals.task_received.connect
def on_task_received(sender=None, request=None, **kwargs):
    record(
        "task_received",
        name=getattr(request, "name", None),
        id=getattr(request, "id", None),
    )


@signals.task_prerun.connect
def on_task_prerun(sender=None, task_id=None, task=None, args=None, kwargs=None, **kw):
    record("task_prerun", name=_name(task), id=task_id, args=list(args or ()),
           kwargs=kwargs, sender_is_task=sender is task)


@signals.task_postrun.connect
def on_task_postrun(sender=None, task_id=None, task=None, args=None, kwargs=None,
                    retval=None, state=None, **kw):
    if isinstance(retval, BaseException):
        retval = f"{type(retval).__name__}{retval.args!r}"
    record("task_postrun", name=_name(task), id=task_id, state=state, retval=retval)


@signals.task_success.connect
def on_task_success(sender=None, result=None, **kwargs):
    record("task_success", name=_name(sender), id=sender.request.id, result=result)


@signals.task_failure.connect
def on_task_failure(sender=None, task_id=None, exception=None, args=None, kwargs=None,
                    traceback=None, einfo=None, **kw):
    record(
        "task_failure",
        name=_name(sender),
        id=task_id,
        exception=f"{type(exception).__name__}{exception.args!r}",
        args=list(args or ()),
        kwargs=kwargs,
        has_traceback=traceback is not None,
        einfo_type=getattr(getattr(einfo, "type", None), "__name__", None),
    )


@signals.task_unknown.connect
def on_task_unknown(sender=None, name=None, id=None, message=None, exc=None, **kwargs):
    record("task_unknown", name=name, id=id, exc=type(exc).__name__)


@signals.task_rejected.connect
def on_task_rejected(sender=None, message=None, exc=None, **kwargs):
    record("task_rejected", exc=type(exc).__name__ if exc is not None else None)
