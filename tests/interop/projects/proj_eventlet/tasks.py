import time

from celery.exceptions import SoftTimeLimitExceeded

from .celery import app


@app.task
def noop():
    """The harness's sentinel."""


@app.task
def add(x, y):
    return x + y


@app.task
def nap(seconds):
    """Sleeps (a green sleep once patched); reports a soft limit it caught."""
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "soft limit caught"
    return "slept"


@app.task
def spin(seconds):
    """Computes without yielding: blocks the hub for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
    return "spun"
