"""Holding a big ETA backlog, side by side: memory, and giving it back at shutdown.

Pre-queues N tasks with an ETA an hour away, starts the worker (``celery
worker`` or ``ccworker``, same flags), waits until it holds all of them
(the queue is empty and every message is in ``unacked``), reads the RSS of
the worker's whole process tree, then sends SIGTERM and times the warm
shutdown until every message is back in the queue. Run from the repository
root::

    .venv/bin/python benchmarks/eta_hold.py --tasks 100000 --pool threads -c 4

Add ``--eta-task-limit 1000`` to see ``worker_eta_task_limit`` bound it.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import uuid

from proctree import tree_rss_kib

HERE = os.path.dirname(os.path.abspath(__file__))
COMMANDS = {
    "celery": [sys.executable, "-m", "celery", "-A", "bench_proj", "worker"],
    "ccworker": [sys.executable, "-m", "celerycompat", "-A", "bench_proj", "worker"],
}


def run_once(kind: str, args: argparse.Namespace) -> dict:
    import redis

    queue = f"bench-eta-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, BENCH_QUEUE=queue, PYTHONPATH=HERE, BENCH_IGNORE_RESULT="1")
    if args.eta_task_limit:
        env["BENCH_ETA_TASK_LIMIT"] = str(args.eta_task_limit)
    os.environ.update(env)
    sys.path.insert(0, HERE)
    from bench_proj.celery import app, noop

    broker = redis.Redis.from_url(app.conf.broker_url)
    broker.delete("unacked", "unacked_index")
    for _ in range(args.tasks):
        noop.apply_async(queue=queue, countdown=3600)
    flags = ["-P", args.pool, "-c", str(args.concurrency), "-l", "WARNING",
             "-n", f"{kind}-{queue}@%h", "--without-mingle", "--without-gossip",
             "--without-heartbeat", "-Q", queue]
    started = time.monotonic()
    worker = subprocess.Popen(COMMANDS[kind] + flags, cwd=HERE, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected_held = min(args.tasks, args.eta_task_limit or args.tasks)
    try:
        while broker.hlen("unacked") < expected_held:
            time.sleep(0.05)
        held_after = time.monotonic() - started
        time.sleep(2.0)
        rss = tree_rss_kib(worker.pid)
        held = broker.hlen("unacked")
    finally:
        stop_started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.wait(600)
        stop_seconds = time.monotonic() - stop_started
    back = broker.llen(queue)
    broker.delete(queue)
    return {"held": held, "held_after": held_after, "rss_mib": rss / 1024,
            "stop_seconds": stop_seconds, "back": back}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--pool", default="threads")
    parser.add_argument("-c", "--concurrency", type=int, default=4)
    parser.add_argument("--eta-task-limit", type=int, default=0)
    args = parser.parse_args()
    print(f"{args.tasks} ETA tasks held, -P {args.pool} -c {args.concurrency}"
          f"{f', worker_eta_task_limit={args.eta_task_limit}' if args.eta_task_limit else ''}"
          " (Redis)")
    rows = {kind: run_once(kind, args) for kind in COMMANDS}
    for kind, row in rows.items():
        print(f"  {kind:9s} held {row['held']:7d} after {row['held_after']:6.1f}s  "
              f"RSS {row['rss_mib']:7.1f} MiB  warm shutdown {row['stop_seconds']:6.1f}s  "
              f"returned {row['back']}")
    ratio = rows["ccworker"]["rss_mib"] / rows["celery"]["rss_mib"]
    print(f"  RSS ratio ccworker/celery: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
