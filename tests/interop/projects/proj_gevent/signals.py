"""Receivers for the task signals a time limit changes.

Under gevent every signal runs in the worker process itself (there are no
pool children), so only what happened is recorded, not where. Only the
time-limited tasks are recorded: hundreds of sleepers starting at once
would each take a Redis connection to record, beyond redis-py's default
pool of 100.
"""

from celery import signals

from ccit_recorder import record

RECORDED = ("hard_limited", "limited_by_message", "hard_limited_late", "soft_limited",
            "soft_caught", "swallow_kill")


def _recorded(sender):
    return getattr(sender, "name", "").rpartition(".")[2] in RECORDED


@signals.task_prerun.connect
def on_task_prerun(sender=None, task_id=None, **kwargs):
    if _recorded(sender):
        record("task_prerun", name=sender.name, id=task_id)


@signals.task_postrun.connect
def on_task_postrun(sender=None, task_id=None, state=None, **kwargs):
    if _recorded(sender):
        record("task_postrun", name=sender.name, id=task_id, state=state)


@signals.task_failure.connect
def on_task_failure(sender=None, task_id=None, exception=None, **kwargs):
    if _recorded(sender):
        record("task_failure", name=sender.name, id=task_id,
               exception=f"{type(exception).__name__}{exception.args!r}")
