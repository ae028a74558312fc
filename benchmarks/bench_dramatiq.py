"""The Dramatiq peer for the no-op drain: one ``noop`` actor on Redis.

Dramatiq stores no results by default, so it is compared with the
``ignore_result`` drain. Broker URL and queue come from the environment, as
for ``bench_proj``.
"""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

broker = RedisBroker(url=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/12"))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=os.environ.get("BENCH_QUEUE", "bench"))
def noop():
    return None
