"""Mingle when a worker is alone on its broker (G4), on a Redis db nobody else uses.

Celery broadcasts ``hello`` and waits its whole reply timeout (1 s) before
it says ``mingle: all alone``. ccworker reads the pidbox exchange's binding
table first (control/mingle.py `_peer_count`): with no other
node bound it says the same thing at once, and a task queued before the
start runs without waiting for the timeout (the seconds are in
docs/performance.md, ``startup``). What a client or an operator sees must
not differ: the same log lines, the task done.
"""

from __future__ import annotations

import pytest
import redis
from test_control import MingleSpec

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

#: A Redis db no other test binds a pidbox queue in.
ALONE_DB = harness.SCRATCH_DB


def test_alone_logs_as_celery_and_runs_the_first_task(interop_log_dir, redis_available):
    broker = harness.BrokerEnv("redis", harness.redis_db_url(ALONE_DB))
    seen = {}
    for kind in harness.selected_kinds():
        redis.Redis.from_url(broker.url).flushdb()
        worker = harness.WorkerProcess(kind, MingleSpec(project="proj_basic"), broker,
                                       interop_log_dir)
        with harness.client_app("proj_basic", worker.env) as app:
            queued = app.tasks["proj_basic.tasks.add"].apply_async((2, 3))
            worker.start()
            try:
                worker.wait_ready()
                value = queued.get(timeout=30)
                lines = [line.split("] ", 1)[1] for line in worker.log().splitlines()
                         if "mingle:" in line]
                seen[kind] = [lines, value]
            finally:
                worker.stop()
    redis.Redis.from_url(broker.url).flushdb()
    for kind, value in seen.items():
        assert value == [["mingle: searching for neighbors", "mingle: all alone"], 5], kind
