"""``-B``: the embedded beat, ``celery worker -B`` against ``ccworker -B``.

Both workers run a project whose ``beat_schedule`` has one entry every
second, on their own queue, and are observed from outside: how many times
the periodic task ran (coarse: at least a few, never more than the seconds
that passed allow, so a second scheduler would show), which process the
schedule ran in (a child: ``beat_init`` and ``beat_embedded_init`` come from
another pid than the worker's, and that process is gone once the worker
exited), the schedule written where ``-s`` says (the shelve file, or
django-celery-beat's table with ``--scheduler``), the log lines, and the exit
status after SIGTERM. And ``-B`` next to a green pool is refused by both
with the same message and status.
"""

from __future__ import annotations

import contextlib
import os
import shelve
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

#: Ticks each worker must reach before it is stopped.
MIN_TICKS = 3
#: Generous: this is a wait for the schedule to run, not a speed assertion.
TICKS_TIMEOUT = 60.0


def redis_broker() -> harness.BrokerEnv:
    return harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))


def records(worker: harness.WorkerProcess) -> list:
    return worker.startup_records + worker.recorded()


def ticks(worker: harness.WorkerProcess) -> int:
    return sum(1 for event, _ in records(worker) if event == "tick")


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return bool(predicate())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is gone for our purpose (its parent, the worker, has exited).
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    return True


def run_beat_workers(spec: harness.WorkerSpec, log_dir: Path) -> dict:
    """Start both kinds with ``spec``, wait for ``MIN_TICKS`` on each, SIGTERM
    them, and return per kind what was seen (the raw material of the test)."""
    broker = redis_broker()
    workers = {k: harness.WorkerProcess(k, spec, broker, log_dir)
               for k in harness.selected_kinds()}
    for worker in workers.values():
        prepare(worker)
    seen: dict = {}
    try:
        started = {}
        for kind, worker in workers.items():
            worker.start()
            started[kind] = time.monotonic()
        for worker in workers.values():
            worker.wait_ready()
        for kind, worker in workers.items():
            reached = wait_for(lambda w=worker: ticks(w) >= MIN_TICKS, TICKS_TIMEOUT)
            assert reached, f"{kind}: {ticks(worker)} ticks\n{worker.log_tail(40)}"
        for kind, worker in workers.items():
            # SIGTERM half-way between two sends: a signal landing while the
            # beat child runs a finalizer of the send is lost, and Celery's
            # worker then waits for its beat forever (ccworker asks again,
            # beat.py; tests/unit/test_embedded_beat.py covers that case).
            sent = ticks(worker)
            wait_for(lambda w=worker, n=sent: ticks(w) > n, 10.0)
            time.sleep(0.5)
            elapsed = time.monotonic() - started[kind]
            # To the worker only (as supervisord does): stopping beat is its job.
            os.kill(worker.pid, signal.SIGTERM)
            code = worker.proc.wait(harness.STOP_TIMEOUT)
            seen[kind] = {"exit": code, "elapsed": elapsed, "records": records(worker),
                          "log": worker.log(), "worker": worker}
    finally:
        for worker in workers.values():
            worker.stop()
            broker.forget_queue(worker.token, worker.queue)
            with contextlib.suppress(Exception):
                client = redis.Redis.from_url(broker.results_url)
                client.delete(worker.record_key)
                client.close()
    return seen


def prepare(worker: harness.WorkerProcess) -> None:
    """Per-project preparation before the worker starts (Django: migrate)."""
    if not worker.spec.project.startswith("dj"):
        return
    env = worker.process_env()
    env["PYTHONPATH"] = str(harness.PROJECTS_DIR)
    env["DJANGO_SETTINGS_MODULE"] = f"{worker.spec.project}.settings"
    done = subprocess.run([sys.executable, "-m", "django", "migrate", "--noinput", "-v", "0"],
                          cwd=str(harness.PROJECTS_DIR), env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def common_observations(seen: dict) -> dict:
    """What must be the same for ``celery worker -B`` and ``ccworker -B``."""
    worker = seen["worker"]
    recs = seen["records"]
    worker_pid = worker.pid
    beat_pids = {d["pid"] for event, d in recs if event in ("beat_init", "beat_embedded_init")}
    n_ticks = sum(1 for event, _ in recs if event == "tick")
    return {
        "exit": seen["exit"],
        "beat_signals": sorted({event for event, _ in recs if event.startswith("beat_")}),
        "scheduler": sorted({d["scheduler"] for event, d in recs if event == "beat_init"}),
        "beat_in_one_child_process": len(beat_pids) == 1 and worker_pid not in beat_pids,
        "beat_process_gone": not any(pid_alive(pid) for pid in beat_pids),
        "ticks_at_least_min": n_ticks >= MIN_TICKS,
        # One scheduler: never more runs than whole seconds passed (+1 for
        # the edges). A second beat would double the count.
        "ticks_not_more_than_seconds": n_ticks <= int(seen["elapsed"]) + 1,
        "log_lines": {line: line in seen["log"]
                      for line in ("beat: Starting...", "Scheduler: Sending due task "
                                   "tick-every-second", "beat: Shutting down...")},
    }


def test_embedded_beat_persistent_scheduler(interop_log_dir, tmp_path):
    """``-B -s <file>``: Celery's default ``PersistentScheduler`` runs in a child,
    sends the entry every second, and leaves its shelve with the entry's run
    count at exit."""
    spec = harness.WorkerSpec(project="proj_beat", pool="prefork", concurrency=1,
                              extra_flags=("-B", "-s", f"{tmp_path}/{{queue}}-schedule"))
    seen = run_beat_workers(spec, interop_log_dir)
    observed = {}
    for kind, one in seen.items():
        obs = observed[kind] = common_observations(one)
        n_ticks = sum(1 for event, _ in one["records"] if event == "tick")
        path = tmp_path / f"{one['worker'].queue}-schedule"
        with shelve.open(str(path), flag="r") as schedule:
            entries = schedule.get("entries", {})
            entry = entries.get("tick-every-second")
            obs["schedule_file"] = {
                "entries": sorted(entries),
                # Runs are counted when sent; every run the worker did was sent.
                "run_count_covers_ticks": entry is not None and entry.total_run_count >= n_ticks,
                "tz": schedule.get("tz"),
            }
    reference = observed.get("celery") or next(iter(observed.values()))
    assert reference["exit"] == 0, reference
    assert reference["beat_in_one_child_process"] and reference["beat_process_gone"], reference
    assert reference["schedule_file"]["run_count_covers_ticks"], reference
    assert reference["scheduler"] == ["PersistentScheduler"], reference
    assert all(reference["log_lines"].values()), reference
    harness.assert_same_across_kinds(observed)


def test_embedded_beat_django_database_scheduler(interop_log_dir, tmp_path):
    """``-B --scheduler django_celery_beat.schedulers:DatabaseScheduler`` in a
    Django project: the entry of ``CELERY_BEAT_SCHEDULE`` is synced into the
    ``PeriodicTask`` table and its run count is saved there at exit."""
    spec = harness.WorkerSpec(
        project="djproj_extras", pool="threads", concurrency=2,
        env=(("CC_TEST_DJANGO_DIR", str(tmp_path)),),
        extra_flags=("-B", "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler"),
    )
    seen = run_beat_workers(spec, interop_log_dir)
    observed = {}
    for kind, one in seen.items():
        obs = observed[kind] = common_observations(one)
        n_ticks = sum(1 for event, _ in one["records"] if event == "tick")
        database = tmp_path / f"{one['worker'].queue}.sqlite3"
        with contextlib.closing(sqlite3.connect(str(database))) as db:
            rows = db.execute("SELECT name, task, total_run_count, last_run_at IS NOT NULL "
                              "FROM django_celery_beat_periodictask ORDER BY name").fetchall()
        obs["periodic_tasks"] = [
            {"name": name, "task": task, "run_count_covers_ticks": count >= n_ticks,
             "last_run_at_set": bool(last)}
            for name, task, count, last in rows
        ]
    reference = observed.get("celery") or next(iter(observed.values()))
    assert reference["exit"] == 0, reference
    assert reference["scheduler"] == ["DatabaseScheduler"], reference
    assert {"name": "tick-every-second", "task": "djproj_extras.probes.tasks.tick",
            "run_count_covers_ticks": True, "last_run_at_set": True} \
        in reference["periodic_tasks"], reference
    harness.assert_same_across_kinds(observed)


def test_beat_refused_with_green_pool(tmp_path):
    """``-B -P gevent``: both refuse, exit 1, with Celery's message."""
    from celery.worker.components import ERR_B_GREEN

    broker = redis_broker()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "CC_TEST_", "PYTHONPATH"))}
    env.update(CC_TEST_BROKER=broker.url, CC_TEST_BACKEND=broker.results_url,
               CC_TEST_QUEUE=f"ccit.beat-refused.{harness.new_token()}")
    observed = {}
    for kind in harness.selected_kinds():
        program = ["celery", "-A", "proj_beat", "worker"] if kind == "celery" \
            else ["celerycompat", "-A", "proj_beat"]
        done = subprocess.run(
            [sys.executable, "-m", *program, "-B", "-P", "gevent", "-s",
             str(tmp_path / f"{kind}-schedule"), "-l", "INFO"],
            cwd=str(harness.PROJECTS_DIR), env=env, capture_output=True, text=True, timeout=60)
        output = done.stdout + done.stderr
        observed[kind] = {
            "exit": done.returncode,
            "message": f"celery.exceptions.ImproperlyConfigured: {ERR_B_GREEN}" in output,
            "started_consuming": " ready." in output,
        }
    reference = observed.get("celery") or next(iter(observed.values()))
    assert reference == {"exit": 1, "message": True, "started_consuming": False}, reference
    harness.assert_same_across_kinds(observed)
