"""Redis leases: a message held past ``visibility_timeout`` runs once, a dead worker's comes back.

kombu's Redis transport restores any un-acked message scored older than
``visibility_timeout``, whoever holds it; stock Celery workers therefore run
long-held ETA and ``acks_late`` tasks twice (Celery #2481, kombu #337).
ccworker re-scores what it holds (consumer/redis_lease.py), on both its
native fast path and kombu's path, so here:

* an ETA task that ccworker holds for three times the timeout, with a stock
  ``celery worker`` consuming the same queue and restoring every second,
  runs exactly once, on ccworker, not before its ETA;
* an ``acks_late`` task running three times the timeout runs once;
* a ccworker killed with SIGKILL while it holds an ETA task leaves the
  message in ``unacked``, and the survivor (Celery or ccworker) restores and
  runs it once the timeout has passed, not before.

The project (``proj_lease``) sets ``visibility_timeout`` to 3 s and makes
every consumer look for stale messages every second.
"""

from __future__ import annotations

import time

import pytest
import redis

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PROJECT = "proj_lease"
VT = 3.0
PATHS = {"native": (), "kombu": (("CCWORKER_REDIS_FAST_PATH", "0"),)}


@pytest.fixture
def redis_broker(redis_available) -> harness.BrokerEnv:
    return harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))


@pytest.fixture
def cluster(redis_broker, interop_log_dir):
    """Start workers of any kind on one shared queue; stop them all at the end."""
    queue = f"ccit.lease.{harness.new_token()}"
    started: list[harness.WorkerProcess] = []

    def start(kind: str, env: tuple = ()) -> harness.WorkerProcess:
        spec = harness.WorkerSpec(project=PROJECT, env=(
            ("CC_TEST_QUEUE", queue), ("CC_TEST_VT", str(VT)), *env))
        worker = harness.WorkerProcess(kind, spec, redis_broker, interop_log_dir).start()
        started.append(worker)
        worker.wait_ready()
        return worker

    start.queue = queue
    start.env = {"CC_TEST_BROKER": redis_broker.url, "CC_TEST_BACKEND": redis_broker.results_url,
                 "CC_TEST_QUEUE": queue, "CC_TEST_RECORD_URL": redis_broker.results_url,
                 "CC_TEST_VT": str(VT)}
    try:
        yield start
    finally:
        for worker in started:
            worker.stop()
        broker = redis.Redis.from_url(redis_broker.url)
        for key in broker.scan_iter(match=f"{queue}*"):
            broker.delete(key)


def _wait(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _held(broker_url: str, task_id: str) -> bool:
    """Whether some worker holds ``task_id``'s message (it is in ``unacked``)."""
    client = redis.Redis.from_url(broker_url)
    return any(task_id.encode() in value for value in client.hvals("unacked"))


def _runs(results_url: str, key: str) -> int:
    return int(redis.Redis.from_url(results_url).get(f"ccit.runs.{key}") or 0)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_eta_held_past_visibility_timeout_runs_once(cluster, redis_broker, path):
    ccworker = cluster("ccworker", PATHS[path])
    key = harness.new_token()
    with harness.client_app(PROJECT, cluster.env) as app:
        sent_at = time.time()
        result = app.tasks["proj_lease.tasks.counted"].apply_async((key,), countdown=3 * VT)
        _wait(lambda: _held(redis_broker.url, result.id), what="ccworker to hold the ETA task")
        assert redis.Redis.from_url(redis_broker.url).llen(cluster.queue) == 0
        cluster("celery")  # a stock worker on the same queue, restoring every second
        assert result.get(timeout=30) == ccworker.nodename
        time.sleep(VT + 2)  # room for a restored copy to run a second time
    assert _runs(redis_broker.results_url, key) == 1
    ran_at = float(redis.Redis.from_url(redis_broker.results_url).lrange(
        f"ccit.ran_at.{key}", 0, 0)[0])
    assert ran_at >= sent_at + 3 * VT - 0.5  # never early (0.5 s: clock rounding)


@pytest.mark.parametrize("path", sorted(PATHS))
def test_acks_late_task_running_past_visibility_timeout_runs_once(cluster, redis_broker, path):
    cluster("ccworker", PATHS[path])
    key = harness.new_token()
    with harness.client_app(PROJECT, cluster.env) as app:
        result = app.tasks["proj_lease.tasks.slow_counted"].apply_async((key, 3 * VT))
        _wait(lambda: _runs(redis_broker.results_url, key) == 1, what="the task to start")
        cluster("celery")
        result.get(timeout=30)
        time.sleep(VT + 2)
    assert _runs(redis_broker.results_url, key) == 1


@pytest.mark.parametrize("survivor", ["celery", "ccworker"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_killed_ccworker_held_messages_are_restored(cluster, redis_broker, path, survivor):
    doomed = cluster("ccworker", PATHS[path])
    key = harness.new_token()
    with harness.client_app(PROJECT, cluster.env) as app:
        result = app.tasks["proj_lease.tasks.counted"].apply_async((key,), countdown=VT)
        _wait(lambda: _held(redis_broker.url, result.id), what="ccworker to hold the ETA task")
        doomed.kill()
        killed_at = time.time()
        # Not lost with its holder: still in ``unacked`` for someone to restore.
        assert _held(redis_broker.url, result.id)
        heir = cluster(survivor)
        assert result.get(timeout=30) == heir.nodename
    ran_at = float(redis.Redis.from_url(redis_broker.results_url).lrange(
        f"ccit.ran_at.{key}", 0, 0)[0])
    # Restored only once the dead worker's lease had lapsed: its last refresh
    # was at most one lease interval (VT / 4) before the kill.
    assert ran_at >= killed_at + VT - VT / 4 - 0.25
    assert _runs(redis_broker.results_url, key) == 1
