"""Append what the worker did, in order, to a Redis list the test reads.

Shared by every test project (the projects directory is on ``sys.path`` of
the worker, which runs from it, and of the test process).

Hooks and signals run inside the worker process; the only channel back to the
test is the outside world, so each call RPUSHes one JSON entry
``[event, detail]`` to the list ``CC_TEST_RECORD`` at ``CC_TEST_RECORD_URL``.
RPUSH is atomic and ordered, so the list is the order the worker emitted
them. Details keep only values that are meaningful across two workers
(task names, ids, states, exception types); the harness normalises ids and
node names afterwards.

If the variables are absent (the module imported by a client, or a user
running the project by hand) recording is a no-op.
"""

import json
import os
import time

import redis

_client = None


def _redis():
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["CC_TEST_RECORD_URL"])
    return _client


def record(event, **detail):
    """RPUSH ``[event, detail]`` (``detail`` JSON-able) if recording is on."""
    key = os.environ.get("CC_TEST_RECORD")
    if not key or not os.environ.get("CC_TEST_RECORD_URL"):
        return
    entry = json.dumps([event, detail], sort_keys=True, default=repr)
    for attempt in range(3):
        try:
            _redis().rpush(key, entry)
            return
        except redis.ConnectionError:
            # A test that cuts the worker's Redis connections (CLIENT KILL)
            # cuts this one too, and a hook may record at that very moment
            # (a step's stop at the cut): the server closed the connection
            # before it read the command, so sending it again on a new one
            # records it once.
            if attempt == 2:
                raise
            time.sleep(0.05)


def wait_for_gate(gate, limit):
    """Block until the test opens ``gate`` (RPUSHes to that list) or ``limit``
    seconds pass; True if it was opened.

    For tasks that must still be running whenever the test looks, however
    slowly a loaded machine lets it look: a fixed sleep would be a race.
    """
    # Short waits: redis-py 8 gives every socket a read timeout of a few
    # seconds by default, which a long BLPOP would exceed.
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if _redis().blpop([gate], timeout=1) is not None:
            return True
    return False
