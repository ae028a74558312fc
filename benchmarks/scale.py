"""Throughput and memory as the backlog grows: 10,000 to 1,000,000 queued tasks.

For each backlog size N: pre-queue N ``noop`` tasks (Celery's own message,
built once by ``apply_async`` and copied with fresh ids, pushed in
pipelines: publishing a million through ``apply_async`` would take longer
than draining them), start the worker, and sample every second how many
messages are left and the RSS of the worker's process tree until the last
result is stored. Prints, per N, the overall rate (start to last result),
the steady rate (from the first to the last result), the spread of the
per-window rates in the middle 80% of the drain, and the peak RSS. Run from
the repository root::

    .venv/bin/python benchmarks/scale.py --sizes 10000,100000,1000000
    .venv/bin/python benchmarks/scale.py --kinds celery,ccworker --sizes 10000,100000

Uses Redis dbs 14 (broker) and 15 (results), flushed at each run. A million
stored results take about 400 MiB in Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid

from proctree import tree_rss_kib

HERE = os.path.dirname(os.path.abspath(__file__))
BROKER = "redis://127.0.0.1:6379/14"
BACKEND = "redis://127.0.0.1:6379/15"
COMMANDS = {
    "celery": [sys.executable, "-m", "celery", "-A", "bench_proj", "worker"],
    "ccworker": [sys.executable, "-m", "celerycompat", "-A", "bench_proj", "worker"],
}


def prequeue(broker, queue: str, count: int, app) -> None:
    """``count`` copies of one real ``noop`` message, each with its own ids."""
    from bench_proj.celery import noop

    template_id = noop.apply_async(queue=queue).id
    template = broker.rpop(queue)
    assert template is not None, "the template message was not on the queue"
    text = template.decode()
    tag = json.loads(text)["properties"]["delivery_tag"]
    parts = text.replace(tag, "\x00TAG\x00").split(template_id)
    pipe = broker.pipeline(transaction=False)
    for index in range(count):
        task_id = str(uuid.uuid4())
        body = task_id.join(parts).replace("\x00TAG\x00", str(uuid.uuid4()))
        pipe.lpush(queue, body)
        if index % 10000 == 9999:
            pipe.execute()
    pipe.execute()


def run_once(kind: str, size: int, args: argparse.Namespace) -> dict:
    import redis

    queue = f"scale-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, BENCH_QUEUE=queue, PYTHONPATH=HERE, BENCH_BROKER=BROKER,
               BENCH_BACKEND=BACKEND, BENCH_IGNORE_RESULT="0")
    os.environ.update(env)
    sys.path.insert(0, HERE)
    from bench_proj.celery import app

    app.conf.task_default_queue = queue
    broker = redis.Redis.from_url(BROKER)
    results = redis.Redis.from_url(BACKEND)
    broker.flushdb()
    results.flushdb()
    prequeue(broker, queue, size, app)
    flags = ["-P", args.pool, "-c", str(args.concurrency), "-l", "WARNING",
             "-n", f"{kind}-{queue}@%h", "--without-mingle", "--without-gossip",
             "--without-heartbeat", "-Q", queue]
    started = time.monotonic()
    worker = subprocess.Popen(COMMANDS[kind] + flags, cwd=HERE, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: list[tuple[float, int]] = []  # (seconds since start, results stored)
    peak_rss = 0
    first_result_at = None
    try:
        while True:
            time.sleep(args.interval)
            now = time.monotonic() - started
            stored = results.dbsize()
            peak_rss = max(peak_rss, tree_rss_kib(worker.pid))
            samples.append((now, stored))
            if first_result_at is None and stored:
                first_result_at = now
            if stored >= size:
                break
            if worker.poll() is not None:
                raise RuntimeError(f"{kind} exited with {worker.returncode}")
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        broker.flushdb()
        results.flushdb()
    total = samples[-1][0]
    # Per-window rates over the middle 80% of the drain (start-up and the
    # tail excluded): how flat is it while the backlog is being worked off?
    window_rates = [
        (b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(samples, samples[1:])
        if size * 0.1 <= a[1] and b[1] <= size * 0.9 and b[0] > a[0]]
    steady = size / (total - first_result_at) if first_result_at is not None and \
        total > first_result_at else float("nan")
    return {
        "overall": size / total,
        "steady": steady,
        "window_min": min(window_rates) if window_rates else float("nan"),
        "window_median": statistics.median(window_rates) if window_rates else float("nan"),
        "window_max": max(window_rates) if window_rates else float("nan"),
        "peak_rss_mib": peak_rss / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--kinds", default="ccworker")
    parser.add_argument("--pool", default="threads")
    parser.add_argument("-c", "--concurrency", type=int, default=4)
    parser.add_argument("--interval", type=float, default=1.0)
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    print(f"no-op drain by backlog size, results stored, -P {args.pool} "
          f"-c {args.concurrency} (Redis)")
    print(f"  {'kind':9s} {'tasks':>9s} {'overall/s':>10s} {'steady/s':>9s} "
          f"{'window min/median/max /s':>26s} {'peak RSS':>9s}")
    for size in sizes:
        for kind in kinds:
            row = run_once(kind, size, args)
            print(f"  {kind:9s} {size:9d} {row['overall']:10.0f} {row['steady']:9.0f} "
                  f"{row['window_min']:8.0f} /{row['window_median']:7.0f} /"
                  f"{row['window_max']:7.0f}  {row['peak_rss_mib']:6.0f} MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
