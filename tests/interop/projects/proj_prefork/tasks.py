"""Tasks that exercise the prefork pool.

``die`` kills its own pool process in one of the ways a process dies in
production: SIGKILL (the OOM killer), ``os._exit`` (a C library calling
exit), a segfault (a crashing extension). With ``once=<key>`` it dies only
the first time it runs for that key (a Redis counter), so a requeued
message then succeeds and the test sees it ran twice.
"""

import ctypes
import os
import signal
import time

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from ccit_recorder import record

from .celery import app

_redis = None


def _client():
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(os.environ["CC_TEST_RECORD_URL"])
    return _redis


def _first_time(key):
    return key is None or _client().incr(f"ccit.once.{key}") == 1


def _die(how):
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "exit3":
        os._exit(3)
    elif how == "exit0":
        os._exit(0)
    elif how == "segfault":
        ctypes.string_at(0)
    elif how == "sysexit":
        raise SystemExit(4)
    time.sleep(5)  # the signal is delivered before this returns
    raise RuntimeError(f"still alive after {how}")


@app.task
def noop():
    return "done"


@app.task
def add(x, y):
    return x + y


@app.task
def pid():
    return os.getpid()


@app.task
def process_facts():
    """How this pool process was started: whether it inherited the main
    process's state (forked), its process name, Celery's fresh-interpreter
    flag."""
    import billiard.process
    from celery import current_app

    from .signals import MAIN_PROCESS_STATE

    # The worker's app (Celery's spawned child unpickles its own, carrying
    # the settings changed in the main process; the project module's
    # ``app`` there is a second instance without them).
    return {"inherited": MAIN_PROCESS_STATE["set_up"],
            "setting": current_app.conf.get("ccit_after_setup"),
            "name": billiard.process.current_process().name,
            "FORKED_BY_MULTIPROCESSING": os.environ.get("FORKED_BY_MULTIPROCESSING")}


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def die(how, once=None):
    if _first_time(once):
        _die(how)
    return "survived"


@app.task(acks_late=True, reject_on_worker_lost=True)
def die_late_requeue(how, once=None):
    if _first_time(once):
        _die(how)
    return "survived"


@app.task(acks_late=True)
def die_late(how, once=None):
    if _first_time(once):
        _die(how)
    return "survived"


class DieAfterReturn(Task):
    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        os.kill(os.getpid(), signal.SIGKILL)


@app.task(base=DieAfterReturn, acks_late=True, reject_on_worker_lost=True)
def succeed_then_die():
    """SUCCESS is stored, then the process dies (in ``after_return``)."""
    return "stored"


class RecordingTask(Task):
    def on_failure(self, exc, task_id, args, kwargs, einfo):
        record("on_failure", name=self.name, id=task_id,
               exc=f"{type(exc).__name__}{exc.args!r}")

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        if isinstance(retval, BaseException):
            retval = f"{type(retval).__name__}{retval.args!r}"
        record("after_return", name=self.name, id=task_id, status=status, retval=retval)


@app.task(base=RecordingTask, time_limit=1)
def hard_limited(seconds=30):
    time.sleep(seconds)
    return "finished"


@app.task(base=RecordingTask)
def limited_by_message(seconds=30):
    time.sleep(seconds)
    return "finished"


@app.task(soft_time_limit=1)
def soft_limited(seconds=30):
    time.sleep(seconds)
    return "finished"


@app.task(soft_time_limit=1, time_limit=3)
def soft_caught(seconds=30):
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded as exc:
        return f"cleaned up after {exc!r}"
    return "finished"


@app.task(time_limit=1, acks_late=True, acks_on_failure_or_timeout=False)
def hard_limited_late(once):
    if _first_time(once):
        time.sleep(30)
    return "second run"
