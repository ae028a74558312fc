"""A channel from task code and signal receivers back to the test.

``record(event, **detail)`` RPUSHes ``json([event, detail])`` to the Redis
list ``CC_TEST_RECORD`` at ``CC_TEST_RECORD_URL``; RPUSH keeps the order the
worker produced them in. Without those variables (a client, a user running
the project by hand) it does nothing. The harness keeps only entries whose
``id`` is one of the scenario's task ids, so details carry an ``id``.
"""

import json
import os

import redis

_conn = {}


def record(event, **detail):
    key = os.environ.get("CC_TEST_RECORD")
    url = os.environ.get("CC_TEST_RECORD_URL")
    if not key or not url:
        return
    client = _conn.get(url)
    if client is None:
        client = _conn[url] = redis.Redis.from_url(url)
    client.rpush(key, json.dumps([event, detail], sort_keys=True, default=repr))
