"""``task_failure``, recorded wherever it runs.

Under ``celery worker -P prefork`` it runs in the pool child for a soft
limit and in the main process for a hard one; under ccworker's solo and
threads pools always in the main process. Where it ran is therefore not
recorded: what it says is.
"""

from celery import signals

from ccit_recorder import record


@signals.task_failure.connect
def on_task_failure(sender=None, task_id=None, exception=None, **kwargs):
    record("task_failure", name=getattr(sender, "name", None), id=task_id,
           exception=f"{type(exception).__name__}{exception.args!r}")
