"""``--statedb`` across a migration: ``celery worker`` -> ``ccworker`` -> ``celery worker``.

One state file, three workers one after the other (on Redis; the file does
not depend on the broker). Each worker checks that every id revoked on an
earlier one is still revoked (``inspect revoked``) and that a task sent
with such an id is discarded, not run; then it revokes one more id and is
stopped (warm, SIGTERM), which is when both Celery and ccworker save. The
logical clock must come back past the value the previous worker saved.

A second test checks that both workers name the file alike (``%n`` is
expanded from the node name, the ``dbm`` module picks the extensions).
"""

from __future__ import annotations

import json
import shelve
import time
import uuid

import pytest

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

PROJECT = "proj_stamps"


def ran_ids(worker: harness.WorkerProcess, results) -> set[str]:
    raw = results.lrange(worker.record_key, 0, -1)
    return {entry[1].get("id") for entry in map(json.loads, raw) if entry[0] == "ran"}


def run_stage(kind: str, statedb: str, earlier: list[str], log_dir) -> dict:
    """Start ``kind`` on ``statedb``, check the ``earlier`` revoked ids, revoke one more, stop."""
    import redis

    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    spec = harness.WorkerSpec(project=PROJECT, extra_flags=("-S", statedb))
    worker = harness.WorkerProcess(kind, spec, broker, log_dir).start()
    results = redis.Redis.from_url(broker.results_url)
    seen: dict = {"kind": kind}
    try:
        worker.wait_ready()
        with harness.client_app(PROJECT, worker.env) as app:
            node = worker.nodename
            inspect = app.control.inspect(destination=[node], timeout=3.0)
            seen["clock"] = inspect.clock()[node]["clock"]
            listed = inspect.revoked()[node]
            seen["earlier ids listed"] = [task_id in listed for task_id in earlier]
            add = app.tasks[f"{PROJECT}.tasks.add"]
            sent = [add.apply_async((1, 1), task_id=task_id) for task_id in earlier]
            control = add.apply_async((2, 2))
            seen["control task"] = control.get(timeout=20)
            seen["earlier states"] = [result.state for result in sent]
            ran = ran_ids(worker, results)
            seen["earlier ran"] = [task_id in ran for task_id in earlier]
            log = worker.log()
            seen["earlier discarded"] = [
                f"Discarding revoked task: {PROJECT}.tasks.add[{task_id}]" in log
                for task_id in earlier]
            new_id = f"revoked-on-{kind}-{uuid.uuid4()}"
            app.control.revoke(new_id, destination=[node], reply=True, timeout=3.0)
            seen["new id"] = new_id
    finally:
        seen["exit code"] = worker.stop()
        broker.forget_queue(worker.token, worker.queue)
        results.delete(worker.record_key)
        results.close()
    return seen


def saved_clock(statedb: str) -> int:
    with shelve.open(statedb, flag="r") as db:
        return db["clock"]


def test_revoked_ids_survive_moves_between_celery_and_ccworker(tmp_path, interop_log_dir,
                                                              redis_available):
    kinds = harness.selected_kinds()
    order = [kinds[0], kinds[-1], kinds[0]]  # celery -> ccworker -> celery
    statedb = str(tmp_path / "worker.state")
    revoked: list[str] = []
    clock = 0
    for step, kind in enumerate(order):
        seen = run_stage(kind, statedb, list(revoked), interop_log_dir)
        n = len(revoked)
        assert seen["exit code"] == 0, seen
        assert seen["control task"] == 4, seen
        assert seen["earlier ids listed"] == [True] * n, (step, seen)
        assert seen["earlier states"] == ["REVOKED"] * n, (step, seen)
        assert seen["earlier ran"] == [False] * n, (step, seen)
        assert seen["earlier discarded"] == [True] * n, (step, seen)
        assert seen["clock"] > clock, (step, seen, clock)
        revoked.append(seen["new id"])
        clock = saved_clock(statedb)


def statedb_files(kind: str, directory, log_dir) -> list[str]:
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    where = directory / kind
    where.mkdir()
    spec = harness.WorkerSpec(project=PROJECT, extra_flags=("--statedb", f"{where}/%n-%h.db"))
    worker = harness.WorkerProcess(kind, spec, broker, log_dir).start()
    try:
        worker.wait_ready()
    finally:
        worker.stop()
        broker.forget_queue(worker.token, worker.queue)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(where.iterdir()):
        time.sleep(0.1)
    return sorted(path.name.replace(worker.node_prefix, "<n>").replace(worker.hostname, "<h>")
                  for path in where.iterdir())


def test_statedb_file_names_match_celery(tmp_path, interop_log_dir, redis_available):
    """``--statedb`` is node-formatted (``%n``, ``%h``) and written where Celery writes it."""
    names = {kind: statedb_files(kind, tmp_path, interop_log_dir)
             for kind in harness.selected_kinds()}
    first = names[harness.selected_kinds()[0]]
    assert first and all(name.startswith("<n>-<h>.db") for name in first), first
    harness.assert_same_across_kinds(names)
