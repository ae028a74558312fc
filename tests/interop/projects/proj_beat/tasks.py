import time

from ccit_recorder import record

from .celery import app


@app.task
def tick():
    """The periodic task: one record per run."""
    record("tick", at=time.time())
