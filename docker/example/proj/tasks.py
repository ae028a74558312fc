"""Ordinary tasks: nothing here knows which worker runs it."""

import time

from celery import shared_task


@shared_task
def add(x, y):
    return x + y


@shared_task(bind=True)
def whoami(self, seconds=0):
    """Which worker ran this (after ``seconds`` of pretend work)."""
    if seconds:
        time.sleep(seconds)
    return {"task_id": self.request.id, "worker": self.request.hostname}


@shared_task
def divide(x, y):
    return x / y
