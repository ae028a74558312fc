"""Receivers for the per-process signals and the failure signal.

``worker_process_init``/``worker_process_shutdown`` run in each pool child;
the pid is recorded so the test can tell children apart (it maps pids to
their order of appearance, which is comparable across two workers).
``task_failure`` fires in the child for ordinary failures and in the parent
for a lost child or a hard time limit; ``in_child`` says where it ran.
"""

import os

from celery import signals

from ccit_recorder import record

_MAIN_PID = os.getpid()

#: Set in the worker's main process once it is set up (``celeryd_after_setup``,
#: sent before the pool starts): a forked pool process inherits it, a spawned
#: one (a fresh interpreter, ``--pool-start-method spawn``) does not.
MAIN_PROCESS_STATE = {"set_up": False}


@signals.celeryd_after_setup.connect
def on_celeryd_after_setup(sender=None, conf=None, **kwargs):
    MAIN_PROCESS_STATE["set_up"] = True
    # A setting changed in the main process: Celery's spawned children get
    # it too (its pickled app carries the changes), as forked ones do.
    conf.update(ccit_after_setup="changed in the main process")


@signals.worker_process_init.connect
def on_worker_process_init(sender=None, **kwargs):
    record("worker_process_init", sender=sender, pid=os.getpid())


@signals.worker_process_shutdown.connect
def on_worker_process_shutdown(sender=None, pid=None, exitcode=None, **kwargs):
    record("worker_process_shutdown", sender=sender, pid=pid, exitcode=exitcode,
           pid_is_self=pid == os.getpid())


@signals.task_failure.connect
def on_task_failure(sender=None, task_id=None, exception=None, **kwargs):
    record("task_failure", name=getattr(sender, "name", None), id=task_id,
           exception=f"{type(exception).__name__}{exception.args!r}",
           in_child=os.getpid() != _MAIN_PID)
