"""A task that takes a little while and counts how often each id ran."""

import os
import time

import redis

from .celery import app

_store = redis.Redis.from_url(os.environ.get("CC_TEST_RECORD_URL", "redis://127.0.0.1:6379/11"))


@app.task(bind=True)
def work(self, key, seconds):
    """Count this run under ``key`` (one hash per test run), take ``seconds``."""
    _store.hincrby(f"ccit.migrate.runs.{key}", self.request.id, 1)
    time.sleep(seconds)
    return self.request.hostname
