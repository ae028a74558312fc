"""Flower 2.x, unmodified, watching a mixed cluster: a celery worker and a ccworker.

Flower builds its views from worker events and inspect replies. With both
kinds of worker on one broker, everything Flower's API says about the
ccworker must have the shape it has for the celery worker (same keys,
same value types, same task fields), and its control endpoints must work
on both. Flower runs as a real ``celery flower`` subprocess on loopback.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

PROJECT = "proj_basic"


class EventSpec(harness.WorkerSpec):
    """Heartbeats on: Flower marks a worker online from them."""

    def flags(self, nodename: str) -> list[str]:
        return [f for f in super().flags(nodename) if f != "--without-heartbeat"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Flower:
    def __init__(self, env: dict, log_dir):
        self.port = free_port()
        self.log_path = log_dir / f"flower-{self.port}.log"
        env = dict(env, FLOWER_UNAUTHENTICATED_API="true", PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", PROJECT, "flower",
                 f"--port={self.port}", "--address=127.0.0.1", "--inspect_timeout=3000"],
                cwd=str(harness.PROJECTS_DIR), env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str):
        with urllib.request.urlopen(self.url(path), timeout=15) as response:
            body = response.read()
            kind = response.headers.get("Content-Type", "")
            return json.loads(body) if "json" in kind else body.decode()

    def post(self, path: str, **form):
        data = urllib.parse.urlencode(form).encode()
        request = urllib.request.Request(self.url(path), data=data, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def wait_up(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.get("/healthcheck")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise AssertionError(f"flower did not start:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


def shape(value):
    """Keys and value types, recursively: what must match between the two workers."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return type(value).__name__


def test_flower_sees_ccworker_as_it_sees_a_celery_worker(interop_log_dir, redis_available):
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    spec = EventSpec(project=PROJECT, pool="threads", concurrency=2, extra_flags=("-E",))
    workers = {kind: harness.WorkerProcess(kind, spec, broker, interop_log_dir)
               for kind in ("celery", "ccworker")}
    # Flower and the client use the celery worker's configuration; the ccworker
    # consumes another queue on the same broker (a mixed cluster).
    env = workers["celery"].process_env()
    flower = Flower(env, interop_log_dir)
    try:
        for worker in workers.values():
            worker.start()
        for worker in workers.values():
            worker.wait_ready()
        flower.wait_up()
        names = {kind: worker.nodename for kind, worker in workers.items()}
        # Flower asks every worker each of these with its own 1 s timeout and
        # keeps what arrived; on a loaded machine one reply can miss a
        # refresh (either worker's), so refresh until both have them all.
        keys = ("stats", "active_queues", "registered", "conf", "timestamp")
        deadline = time.monotonic() + 30
        listed: dict = {}
        while time.monotonic() < deadline:
            listed = flower.get("/api/workers?refresh=1")
            if all(listed.get(name, {}).get(key) for name in names.values() for key in keys):
                break
            time.sleep(0.5)
        assert set(names.values()) <= set(listed), listed.keys()

        # The same worker-level view of both.
        for name in names.values():
            for key in keys:
                assert key in listed[name], (name, key)
        assert shape(listed[names["ccworker"]]["stats"]) == \
            shape(listed[names["celery"]]["stats"])
        assert shape(listed[names["ccworker"]]["active_queues"]) == \
            shape(listed[names["celery"]]["active_queues"])
        assert sorted(listed[names["ccworker"]]["registered"]) == \
            sorted(listed[names["celery"]]["registered"])

        # Tasks run by each worker, as Flower's task views show them.
        ids = {}
        with harness.client_app(PROJECT, workers["celery"].env) as app:
            for kind, worker in workers.items():
                ok = app.send_task("proj_basic.tasks.add", (2, 3), queue=worker.queue)
                bad = app.send_task("proj_basic.tasks.fail", queue=worker.queue)
                assert ok.get(timeout=20) == 5
                with pytest.raises(ValueError):
                    bad.get(timeout=20)
                ids[kind] = (ok.id, bad.id)
        infos = {}
        for kind, (ok_id, bad_id) in ids.items():
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    ok_info = flower.get(f"/api/task/info/{ok_id}")
                    bad_info = flower.get(f"/api/task/info/{bad_id}")
                except urllib.error.HTTPError:
                    time.sleep(0.3)
                    continue
                if ok_info.get("state") == "SUCCESS" and bad_info.get("state") == "FAILURE":
                    break
                time.sleep(0.3)
            infos[kind] = (ok_info, bad_info)
            assert ok_info["state"] == "SUCCESS" and ok_info["result"] == "5"
            assert ok_info["worker"] == names[kind]
            assert bad_info["state"] == "FAILURE" and "ValueError" in bad_info["exception"]
        for celery_info, cc_info in zip(infos["celery"], infos["ccworker"]):
            assert shape(cc_info) == shape(celery_info)
            assert {k: cc_info[k] for k in ("name", "args", "kwargs", "state", "result",
                                            "retries", "exception")} == \
                {k: celery_info[k] for k in ("name", "args", "kwargs", "state", "result",
                                             "retries", "exception")}

        tasks = flower.get("/api/tasks")
        assert {ids["ccworker"][0], ids["ccworker"][1]} <= set(tasks)

        # Pages and metrics render with the ccworker in them.
        assert names["ccworker"] in flower.get(f"/worker/{names['ccworker']}")
        metrics = flower.get("/metrics")
        assert f'worker="{names["ccworker"]}"' in metrics

        # Control buttons: time limit and rate limit (ok on both) and shutdown.
        for kind in workers:
            status, reply = flower.post("/api/task/timeout/proj_basic.tasks.add",
                                        workername=names[kind], hard="20", soft="10")
            assert status == 200, reply
            status, reply = flower.post("/api/task/rate-limit/proj_basic.tasks.add",
                                        workername=names[kind], ratelimit="100/s")
            assert (status, reply) == (200, {"message": "new rate limit set successfully"})
        status, reply = flower.post(f"/api/worker/shutdown/{names['ccworker']}")
        assert status == 200, reply
        workers["ccworker"].proc.wait(30)
        assert workers["ccworker"].proc.returncode == 0
    finally:
        flower.stop()
        for worker in workers.values():
            worker.stop()
            broker.forget_queue(worker.token, worker.queue)
