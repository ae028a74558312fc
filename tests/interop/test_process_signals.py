"""SIGUSR1 and SIGHUP, beside ``celery worker``.

Celery's worker installs two operator signals besides the shutdown ones:
SIGUSR1 prints every thread's stack and locals (``cry``: what an operator
sends a worker that seems stuck), and - when stdout is not a terminal, as
under a process manager - SIGHUP restarts the worker in place: a warm stop,
then the same command line ``exec``\\ ed, so the pid stays. For each pool
family the same steps run on both workers and what an operator sees is
compared: the dump names the main thread, a task still runs, after SIGHUP
the restart line is printed, the same pid logs ``ready.`` a second time
and runs a task again; the worker runs with ``--pidfile``, which the
restarted worker must not take for another's. Redis.

Both workers run as their console scripts (``celery``, ``ccworker``), as a
deployment starts them: Celery's restart ``exec``\\ s ``sys.argv``, which
under ``python -m celery`` names ``celery/__main__.py`` and fails with an
ImportError (a Celery defect ccworker does not share; its restart always
runs ``python -m celerycompat``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PROJECT = "proj_basic"


class ScriptWorker(harness.WorkerProcess):
    """A worker started by its console script instead of ``python -m``."""

    def command(self) -> list[str]:
        command = super().command()
        bindir = Path(sys.executable).parent
        if command[2] == "celery":
            return [str(bindir / "celery"), *command[3:]]
        return [str(bindir / "ccworker"), *command[3:]]


def add(worker: harness.WorkerProcess, x: int, y: int) -> object:
    with harness.client_app(PROJECT, worker.env) as app:
        result = app.send_task(f"{PROJECT}.tasks.add", args=(x, y), queue=worker.queue)
        return result.get(timeout=30)


def observe(kind: str, pool: str, broker: harness.BrokerEnv, log_dir, tmp: Path) -> dict:
    pidfile = tmp / f"{kind}-{pool}.pid"
    spec = harness.WorkerSpec(project=PROJECT, pool=pool, concurrency=2,
                              extra_flags=("--pidfile", str(pidfile)))
    worker = ScriptWorker(kind, spec, broker, log_dir).start()
    ready = f"{worker.nodename} ready."
    seen: dict = {}
    try:
        worker.wait_ready()
        pid = worker.pid
        os.kill(pid, signal.SIGUSR1)
        harness.wait_until(lambda: "LOCAL VARIABLES" in worker.log(), 20)
        dump = worker.log()
        seen["dump names the main thread"] = "\nMainThread\n" in dump
        seen["dump has a stack"] = 'File "' in dump.split("MainThread", 1)[-1]
        seen["runs a task after the dump"] = add(worker, 2, 3)

        os.kill(pid, signal.SIGHUP)
        harness.wait_until(lambda: worker.log().count(ready) >= 2 or not worker.alive(), 60)
        log = worker.log()
        seen["restart line"] = [line.split("(")[0] for line in log.splitlines()
                                if line.startswith("Restarting celery worker (")]
        seen["ready again"] = log.count(ready)
        seen["same pid"] = worker.alive() and worker.pid == pid
        seen["pidfile names it"] = pidfile.read_text().strip() == str(pid)
        seen["runs a task after the restart"] = add(worker, 4, 5)
    finally:
        seen["exit after SIGTERM"] = worker.stop()
        seen["pidfile removed"] = not pidfile.exists()
    return seen


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_usr1_dumps_stacks_and_hup_restarts(pool, redis_available, interop_log_dir, tmp_path):
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    observed = {kind: observe(kind, pool, broker, interop_log_dir, tmp_path)
                for kind in harness.selected_kinds()}
    celery_seen = observed.get("celery", next(iter(observed.values())))
    assert celery_seen["dump names the main thread"]
    assert celery_seen["restart line"] == ["Restarting celery worker "]
    assert celery_seen["ready again"] == 2
    assert celery_seen["pidfile names it"] and celery_seen["pidfile removed"]
    for seen in observed.values():
        assert seen == celery_seen
