"""What the interop suite's fixtures cost: the figures in tests/README.md.

Times, on this machine and brokers, the start of a ``celery worker`` and of a
ccworker (process start to the ``ready.`` line, solo and prefork, Redis and
RabbitMQ), the creation and deletion of a RabbitMQ vhost (``rabbitmqctl``)
and the start of Flower (to its first HTTP answer). Median of ``--repeat``
runs. Not a test: it asserts nothing, it prints::

    .venv/bin/python tests/interop/fixture_costs.py --repeat 3
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "projects")]

import harness  # noqa: E402


def worker_start(kind: str, broker: harness.BrokerEnv, pool: str, log_dir: Path) -> float:
    spec = harness.WorkerSpec(pool=pool, concurrency=2 if pool == "prefork" else 1)
    worker = harness.WorkerProcess(kind, spec, broker, log_dir)
    started = time.monotonic()
    worker.start()
    try:
        worker.wait_ready()
        return time.monotonic() - started
    finally:
        worker.stop()
        broker.forget_queue(worker.token, worker.queue)


def vhost_cycle() -> tuple[float, float]:
    vhost = harness.RabbitVhost()
    started = time.monotonic()
    vhost.create()
    created = time.monotonic()
    vhost.delete()
    return created - started, time.monotonic() - created


def flower_start(broker_url: str) -> float:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-b", broker_url, "flower", f"--port={port}",
         "--address=127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - started < 60:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=1)
                return time.monotonic() - started
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("flower did not answer within 60 s")
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="ccfixture-costs-"))
    vhost = harness.RabbitVhost()
    amqp = harness.BrokerEnv("amqp", vhost.create())
    redis_env = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    rows = []
    try:
        for broker in (redis_env, amqp):
            for pool in ("solo", "prefork"):
                for kind in harness.WORKER_KINDS:
                    runs = [worker_start(kind, broker, pool, log_dir) for _ in range(args.repeat)]
                    rows.append((f"{kind} start, {pool}, {broker.name}", statistics.median(runs)))
    finally:
        vhost.delete()
    cycles = [vhost_cycle() for _ in range(args.repeat)]
    rows.append(("RabbitMQ vhost create", statistics.median(c[0] for c in cycles)))
    rows.append(("RabbitMQ vhost delete", statistics.median(c[1] for c in cycles)))
    flower = [flower_start(redis_env.url) for _ in range(args.repeat)]
    rows.append(("Flower start (first HTTP answer)", statistics.median(flower)))
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} s |")


if __name__ == "__main__":
    main()
