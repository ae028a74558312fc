"""Tasks that reach each of the Request hooks once."""

import time

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded

from .celery import app


class TrackedTask(Task):
    Request = "proj_requests.requests:TrackedRequest"


@app.task(base=TrackedTask)
def ok(x):
    return x


@app.task(base=TrackedTask)
def boom():
    raise ValueError("boom")


@app.task(base=TrackedTask, acks_late=True)
def late_boom():
    raise KeyError("late")


@app.task(base=TrackedTask, bind=True, max_retries=1)
def retry_once(self):
    if self.request.retries == 0:
        raise self.retry(countdown=0.1, exc=ValueError("again"))
    return "retried"


@app.task(base=TrackedTask, acks_late=True)
def rejected():
    raise Reject("no", requeue=False)


@app.task(base=TrackedTask, time_limit=1)
def hard_limit():
    time.sleep(10)


@app.task(base=TrackedTask, soft_time_limit=0.5)
def soft_limit():
    try:
        time.sleep(10)
    except SoftTimeLimitExceeded:
        return "soft"


@app.task(base=TrackedTask)
def sleeper(seconds):
    time.sleep(seconds)
