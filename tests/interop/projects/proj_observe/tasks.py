"""One task per outcome the metrics count."""

import time

from celery.exceptions import Reject

from .celery import app


@app.task
def ok(x):
    return x


@app.task
def fail():
    raise ValueError("expected failure")


@app.task(bind=True, max_retries=1, default_retry_delay=0)
def retry_once(self):
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    return "retried"


@app.task(acks_late=True)
def reject():
    raise Reject("not wanted", requeue=False)


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds


@app.task
def stall_on_receipt(seconds):
    """Its ``task_received`` receiver blocks the consumer thread (signals.py)."""
    return seconds


@app.task
def log_line(text):
    """Logs through the task logger (Celery's TaskFormatter, or JSON)."""
    from celery.utils.log import get_task_logger

    get_task_logger(__name__).warning("task says %s", text)
    return text


@app.task
def gated(gate, limit=60.0):
    """Runs until the test opens ``gate`` (RPUSHes to it), so a check made
    while it runs never races its end on a loaded machine. True if opened."""
    import os

    import redis

    client = redis.Redis.from_url(os.environ["CC_TEST_RECORD_URL"])
    try:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if client.llen(gate):
                return True
            time.sleep(0.05)
        return False
    finally:
        client.close()
