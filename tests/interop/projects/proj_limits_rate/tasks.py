"""Rate-limited tasks and an unlimited one; each records when it ran.

``ran`` records carry the wall-clock start time, so a test can check the
spacing a rate limit imposes (coarsely: never an upper bound on time).
"""

import time

from ccit_recorder import record

from .celery import app


def _ran(name, n):
    record("ran", name=name, n=n, at=time.time())
    return n


@app.task(rate_limit="2/s")
def limited(n):
    return _ran("limited", n)


@app.task
def annotated(n):
    """No rate limit of its own: ``task_annotations`` gives it ``2/s``."""
    return _ran("annotated", n)


@app.task(rate_limit="30/m")
def paced(n):
    """One every two seconds: long enough to act on a message while it waits."""
    return _ran("paced", n)


@app.task(rate_limit="1/h")
def hourly(n):
    """After the first, the next token is an hour away."""
    return _ran("hourly", n)


@app.task
def free(n):
    return _ran("free", n)


@app.task
def noop():
    """A sentinel: once its result exists, earlier messages were handled."""
    return "done"
