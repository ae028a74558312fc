"""``-D/--detach`` beside ``celery worker -D`` (issue 15, item 5).

The same command line, with ``--pidfile``, ``--logfile`` and ``--umask``,
is run for both workers, and what an init script or an operator sees is
compared: the command returns 0 at once; a process of a new session,
not a child of the command, writes the pidfile and logs ``ready.`` to the
log file, created with the umask's mode; a real Celery client's task runs;
SIGTERM to the pid in the file stops it and removes the file. A second
``-D`` on the same pidfile while the first runs starts no second worker
and says why on the command's stderr (which the daemon keeps until it
has checked the pidfile). Redis.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

PROJECT = "proj_basic"


def launch(worker: harness.WorkerProcess) -> subprocess.CompletedProcess:
    """Run the worker's command line (with ``-D``) and wait for the command."""
    return subprocess.run(worker.command(), cwd=str(harness.PROJECTS_DIR),
                          env=worker.process_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)


def pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def observe(kind: str, broker: harness.BrokerEnv, tmp: Path, log_dir: Path) -> dict:
    pidfile, logfile = tmp / f"{kind}.pid", tmp / f"{kind}.log"
    spec = harness.WorkerSpec(project=PROJECT, pool="threads", concurrency=2, extra_flags=(
        "-D", "--pidfile", str(pidfile), "--logfile", str(logfile), "--umask", "077"))
    worker = harness.WorkerProcess(kind, spec, broker, log_dir)
    seen: dict = {}
    pid = None
    try:
        started = time.monotonic()
        done = launch(worker)
        seen["command exit"] = done.returncode
        seen["command returned at once"] = time.monotonic() - started < 30
        seen["command output"] = (done.stdout.strip(), done.stderr.strip())
        harness.wait_until(lambda: f"{worker.nodename} ready." in _read(logfile), 60)
        pid = pid_in(pidfile)
        assert pid is not None and harness.pid_alive(pid), _read(logfile)
        seen["daemon is not the command"] = pid != os.getpid()
        seen["daemon in another session"] = os.getsid(pid) != os.getsid(0)
        seen["log file mode"] = oct(stat.S_IMODE(logfile.stat().st_mode))
        with harness.client_app(PROJECT, worker.env) as app:
            result = app.send_task(f"{PROJECT}.tasks.add", args=(2, 3), queue=worker.queue)
            seen["result"] = result.get(timeout=30)
        again = launch(worker)
        seen["second -D exit"] = again.returncode
        harness.wait_until(lambda: "already exists" in again.stderr, 1)
        seen["second -D says"] = [line for line in again.stderr.splitlines()
                                  if "already exists" in line]
        seen["first still the one"] = pid_in(pidfile) == pid and harness.pid_alive(pid)
        os.kill(pid, signal.SIGTERM)
        harness.wait_until(lambda: not harness.pid_alive(pid), 30)
        seen["stopped by SIGTERM"] = not harness.pid_alive(pid)
        seen["pidfile removed"] = not pidfile.exists()
    finally:
        if pid is not None and harness.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    return seen


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def test_detach_as_celery_does(redis_available, tmp_path, interop_log_dir):
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    observed = {kind: observe(kind, broker, tmp_path, interop_log_dir)
                for kind in ("celery", "ccworker")}
    for seen in observed.values():  # the pidfile path differs per side
        seen["second -D says"] = [line.replace(str(tmp_path), "<tmp>")
                                  .replace("celery.pid", "<pid>").replace("ccworker.pid", "<pid>")
                                  for line in seen["second -D says"]]
    assert observed["ccworker"] == observed["celery"]
    assert observed["ccworker"]["command exit"] == 0
    assert observed["ccworker"]["log file mode"] == "0o600"
    assert observed["ccworker"]["result"] == 5
    assert observed["ccworker"]["second -D says"]
    assert observed["ccworker"]["pidfile removed"]
