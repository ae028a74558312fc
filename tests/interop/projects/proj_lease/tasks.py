"""Tasks that count their runs, so a test can see a message delivered twice."""

import os
import time

import redis

from .celery import app

_counts = redis.Redis.from_url(os.environ.get("CC_TEST_RECORD_URL", "redis://127.0.0.1:6379/11"))


@app.task(bind=True)
def counted(self, key):
    """Count one run under ``key`` and note when it ran."""
    _counts.incr(f"ccit.runs.{key}")
    _counts.rpush(f"ccit.ran_at.{key}", repr(time.time()))
    return self.request.hostname


@app.task(bind=True, acks_late=True)
def slow_counted(self, key, seconds):
    """Count one run, then take ``seconds`` (an acks_late message held that long)."""
    _counts.incr(f"ccit.runs.{key}")
    time.sleep(seconds)
    return self.request.hostname
