"""Tasks that write down every run, so a test can count deliveries.

Each run of ``late`` (``acks_late``) or ``early`` (early ack, Celery's
default) increments ``<key>.runs`` field ``<task id>:<attempt>`` when it
starts (and notes the time on ``<key>.starts``; and on ``<key>.after_success``
if the task's SUCCESS was stored already), and pushes a JSON line
onto ``<key>.done`` when it ends: a field
above 1 is a message delivered more than once, never a publisher's retry
(each publish attempt carries its own ``attempt``). Both live in the Redis
at ``CC_TEST_RECORD_URL``, which the tests never restart.
"""

import json
import os
import time

import redis

from .celery import app

_records = redis.Redis.from_url(os.environ.get("CC_TEST_RECORD_URL", "redis://127.0.0.1:6379/11"))


def _surviving_cuts(call, *args):
    """``call(*args)``, sent again on a new connection when the test's CLIENT
    KILL closed the one it went out on (the test cuts every connection of the
    worker's processes, these included). Otherwise the task would fail, and
    count as a task the worker lost. The server closed the connection before
    reading the command, so it runs once (a kill between executing it and the
    reply reaching us would count a run twice: a failure of the test, never a
    hidden loss; not seen)."""
    for attempt in range(6):
        try:
            return call(*args)
        except (redis.ConnectionError, redis.TimeoutError):
            if attempt == 5:
                raise
            time.sleep(0.05 * (attempt + 1))


def _run(task, key, attempt, sent_at, seconds):
    field = f"{task.request.id}:{attempt}"
    started = time.time()
    _surviving_cuts(_records.hincrby, f"{key}.runs", field, 1)
    if _surviving_cuts(_result_stored, task):
        # The worst duplicate: the task completed, its client saw SUCCESS,
        # and its message came back anyway (the ack was lost).
        _surviving_cuts(_records.hincrby, f"{key}.after_success", field, 1)
    _surviving_cuts(_records.rpush, f"{key}.starts",
                    json.dumps({"field": field, "started": started}))
    if seconds:
        time.sleep(seconds)
    _surviving_cuts(_records.rpush, f"{key}.done", json.dumps({
        "id": task.request.id, "attempt": attempt, "sent_at": sent_at,
        "started": started, "finished": time.time(),
        "redelivered": bool(task.request.delivery_info.get("redelivered")),
    }))
    return attempt


def _result_stored(task):
    backend = task.backend
    stored = backend.client.get(backend.get_key_for_task(task.request.id))
    return bool(stored) and backend.decode(stored).get("status") == "SUCCESS"


@app.task(bind=True, acks_late=True)
def late(self, key, attempt, sent_at, seconds=0.0):
    return _run(self, key, attempt, sent_at, seconds)


@app.task(bind=True)
def early(self, key, attempt, sent_at, seconds=0.0):
    return _run(self, key, attempt, sent_at, seconds)
