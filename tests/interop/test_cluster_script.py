"""docker/cluster.py: the compose topology as local processes, driven for real.

The script is run as a user runs it (a subprocess, then Ctrl-C), on a Redis
database of its own; this test then asks Flower's REST API, not the
script, whether both workers are online and ran tasks, and checks that
Ctrl-C stops every process it started. ``--check`` (the script's own
scenario) must pass too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import redis

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

SCRIPT = harness.REPO_ROOT / "docker" / "cluster.py"
#: A database no other test uses: the cluster consumes the default ``celery``
#: queue, as the example does.
CLUSTER_DB = harness.SCRATCH_DB


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def cluster_broker(redis_available):
    url = harness.redis_db_url(CLUSTER_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def command(broker: str, log_dir, *extra: str) -> tuple[list[str], int, int]:
    flower, metrics = free_port(), free_port()
    argv = [sys.executable, str(SCRIPT), "--broker", broker, "--flower-port", str(flower),
            "--metrics-port", str(metrics), "--log-dir", str(log_dir), *extra]
    return argv, flower, metrics


def api(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=15) as response:
        return json.loads(response.read())


def test_cluster_runs_both_workers_with_flower_and_stops_on_ctrl_c(cluster_broker,
                                                                    interop_log_dir):
    log_dir = interop_log_dir / f"cluster-{os.getpid()}-{time.monotonic_ns()}"
    argv, flower_port, metrics_port = command(cluster_broker, log_dir, "--interval", "0.5")
    script = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              cwd=str(harness.REPO_ROOT), start_new_session=True)
    output: list[str] = []
    pids: list[int] = []
    try:
        names = None
        deadline = time.monotonic() + 120
        assert script.stdout is not None
        # Wait for the URLs, then for a tally line with both workers in it.
        while time.monotonic() < deadline:
            line = script.stdout.readline()
            if not line:
                break
            output.append(line)
            started = re.match(r"started (\S+) \(pid (\d+)\)", line)
            if started:
                pids.append(int(started.group(2)))
            workers = re.match(r"workers:\s+(\S+), (\S+)", line)
            if workers:
                names = workers.groups()
            if names and line.startswith("tasks done:") and all(n in line for n in names):
                break
        else:
            pytest.fail("no tally with both workers:\n" + "".join(output))
        assert names and len(pids) == 3, "".join(output)
        assert f"http://127.0.0.1:{flower_port}" in "".join(output)
        celery_name, ccworker_name = names
        assert celery_name.startswith("celery-worker@") and ccworker_name.startswith("ccworker@")

        # Flower's own view: both online, tasks succeeded on each.
        online = api(flower_port, "/api/workers?status=true")
        assert online.get(celery_name) is True and online.get(ccworker_name) is True, online
        deadline = time.monotonic() + 30
        while True:
            tasks = api(flower_port, "/api/tasks?state=SUCCESS")
            by_worker = {info.get("worker") for info in tasks.values()}
            if {celery_name, ccworker_name} <= by_worker or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert {celery_name, ccworker_name} <= by_worker, by_worker
        workers = api(flower_port, "/api/workers?refresh=1")
        assert workers[ccworker_name]["stats"]["pool"]["max-concurrency"] == 2
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz",
                                    timeout=10) as response:
            assert response.status == 200

        # Ctrl-C: everything stops, cleanly.
        os.kill(script.pid, signal.SIGINT)
        rest, _ = script.communicate(timeout=90)
        output.append(rest)
        assert script.returncode == 0, "".join(output)
        assert "cluster stopped\n" in rest
        assert [pid for pid in pids if harness.pid_alive(pid)] == []
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
            for pid in pids:  # the script's children run in sessions of their own
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def test_check_mode_passes(cluster_broker, interop_log_dir):
    log_dir = interop_log_dir / f"cluster-check-{os.getpid()}-{time.monotonic_ns()}"
    argv, _, _ = command(cluster_broker, log_dir, "--check")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240,
                          cwd=str(harness.REPO_ROOT))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Flower lists both workers online" in done.stdout
    assert done.stdout.rstrip().endswith("check passed")
