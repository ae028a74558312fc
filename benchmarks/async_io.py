"""I/O-bound tasks at high concurrency: ``async def`` on ``-P asyncio`` against gevent.

The same work three ways, each worker at ``-c 1000`` on Redis, results stored:

* ``ccworker -P asyncio``: ``asleep``, ``await asyncio.sleep(0.01)``;
* ``ccworker -P gevent`` and ``celery worker -P gevent``: ``sleepy``,
  ``time.sleep(0.01)`` (gevent's once the worker patched the process).

N tasks are queued before the worker starts; the time is from its start to
the last result stored (startup included, as in drain.py). Memory: the
worker tree's peak RSS during the drain minus its RSS when idle (started on
an empty queue), per 1,000 tasks that could run at once. Run from the
repository root::

    .venv/bin/python benchmarks/async_io.py --tasks 20000 --repeat 3

Figures go to docs/performance.md with the command; tests never assert on time.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid

from proctree import cpu_seconds_at_exit, tree_rss_kib

HERE = os.path.dirname(os.path.abspath(__file__))
#: name -> (command, pool, task)
KINDS = {
    "ccworker-asyncio": ("celerycompat", "asyncio", "asleep"),
    "ccworker-gevent": ("celerycompat", "gevent", "sleepy"),
    "celery-gevent": ("celery", "gevent", "sleepy"),
}


def start(kind: str, queue: str, concurrency: int) -> subprocess.Popen:
    module, pool, _ = KINDS[kind]
    command = [sys.executable, "-m", module, "-A", "bench_proj", "worker", "-P", pool,
               "-c", str(concurrency), "-l", "WARNING", "-n", f"{kind}-{queue}@%h",
               "--without-mingle", "--without-gossip", "--without-heartbeat", "-Q", queue]
    env = dict(os.environ, BENCH_QUEUE=queue, PYTHONPATH=HERE)
    return subprocess.Popen(command, cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def idle_rss(kind: str, concurrency: int, settle: float = 4.0) -> int:
    """RSS (KiB) of the worker tree on an empty queue, once started."""
    worker = start(kind, f"bench-idle-{uuid.uuid4().hex[:8]}", concurrency)
    try:
        time.sleep(settle)
        return tree_rss_kib(worker.pid)
    finally:
        worker.send_signal(signal.SIGTERM)
        cpu_seconds_at_exit(worker, 30)


def run_once(kind: str, args: argparse.Namespace) -> tuple[float, int]:
    """(seconds, peak RSS KiB) of one drain; its CPU per task goes to `CPU`."""
    import redis

    sys.path.insert(0, HERE)
    from bench_proj.celery import app
    from celery._state import _set_task_join_will_block

    # No result subscription per task sent (Celery's Redis backend makes one
    # unless joins would block): 20,000 of them swamp the client's pub/sub.
    _set_task_join_will_block(True)

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    results = redis.Redis.from_url(app.conf.result_backend)
    results.flushdb()
    task = app.tasks[f"bench_proj.celery.{KINDS[kind][2]}"]
    with app.producer_or_acquire() as producer:
        ids = [task.apply_async((args.seconds,), queue=queue, producer=producer).id
               for _ in range(args.tasks)]
    peak = [0]
    started = time.monotonic()
    worker = start(kind, queue, args.concurrency)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss_kib(worker.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        last = f"celery-task-meta-{ids[-1]}"
        while not results.exists(last) or results.dbsize() < len(ids):
            time.sleep(0.01)
        return time.monotonic() - started, peak[0]
    finally:
        done.set()
        sampler.join()
        worker.send_signal(signal.SIGTERM)
        cpu = cpu_seconds_at_exit(worker, 60) / args.tasks * 1e6
        CPU[kind].append(cpu)


CPU: dict[str, list[float]] = {kind: [] for kind in KINDS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("-c", "--concurrency", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=0.01)
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    kinds = [kind for kind in args.kinds.split(",") if kind]
    idle = {kind: idle_rss(kind, args.concurrency) for kind in kinds}
    runs: dict[str, list[tuple[float, int]]] = {kind: [] for kind in kinds}
    for _ in range(args.repeat):
        for kind in kinds:
            runs[kind].append(run_once(kind, args))
    print(f"drain of {args.tasks} tasks sleeping {args.seconds * 1000:.0f} ms, "
          f"-c {args.concurrency}, results stored (Redis)")
    rates = {}
    for kind in kinds:
        median = statistics.median(seconds for seconds, _ in runs[kind])
        rates[kind] = args.tasks / median
        peak = max(rss for _, rss in runs[kind])
        per_thousand = (peak - idle[kind]) / 1024 / (args.concurrency / 1000)
        cpu = statistics.median(CPU[kind])
        print(f"  {kind:17s} median {median:6.2f}s {rates[kind]:7.0f} tasks/s  "
              f"CPU {cpu:5.0f} us/task  RSS idle {idle[kind] / 1024:5.1f} MiB, "
              f"peak {peak / 1024:5.1f} MiB ({per_thousand:+.1f} MiB per 1,000 running)")
    base = rates.get("celery-gevent")
    if base:
        for kind in kinds:
            if kind != "celery-gevent":
                print(f"  ratio {kind}/celery-gevent: {rates[kind] / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
