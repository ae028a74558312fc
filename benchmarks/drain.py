"""No-op drain, side by side: how fast does a worker empty a queue of N tasks?

Pre-queues N ``noop`` tasks, starts the worker (``celery worker`` or
``ccworker``, same flags), and times from start until the last result is
stored (or, with ``--ignore-result``, until the queue and the worker's
reservations are empty). Kinds alternate and repeat; medians and ratios are
printed. Run from the repository root::

    .venv/bin/python benchmarks/drain.py --tasks 5000 --repeat 3 --pool threads -c 4

Numbers go to docs/performance.md with the command that produced them;
tests never assert on time.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
COMMANDS = {
    "celery": [sys.executable, "-m", "celery", "-A", "bench_proj", "worker"],
    "ccworker": [sys.executable, "-m", "celerycompat", "-A", "bench_proj", "worker"],
}


def run_once(kind: str, args: argparse.Namespace) -> float:
    import redis

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    env = dict(os.environ, BENCH_QUEUE=queue, PYTHONPATH=HERE,
               BENCH_IGNORE_RESULT="1" if args.ignore_result else "0")
    os.environ.update(env)
    sys.path.insert(0, HERE)
    from bench_proj.celery import app, noop

    app.conf.task_default_queue = queue
    app.conf.task_ignore_result = args.ignore_result
    results = redis.Redis.from_url(app.conf.result_backend)
    results.flushdb()
    ids = [noop.apply_async(queue=queue).id for _ in range(args.tasks)]
    flags = ["-P", args.pool, "-c", str(args.concurrency), "-l", "WARNING",
             "-n", f"{kind}-{queue}@%h", "--without-mingle", "--without-gossip",
             "--without-heartbeat", "-Q", queue]
    started = time.monotonic()
    worker = subprocess.Popen(COMMANDS[kind] + flags, cwd=HERE, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        broker = redis.Redis.from_url(app.conf.broker_url)
        if args.ignore_result:
            while broker.llen(queue) or broker.hlen("unacked"):
                time.sleep(0.005)
        else:
            last = f"celery-task-meta-{ids[-1]}"
            while not results.exists(last) or results.dbsize() < len(ids):
                time.sleep(0.005)
        return time.monotonic() - started
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pool", default="threads")
    parser.add_argument("-c", "--concurrency", type=int, default=4)
    parser.add_argument("--ignore-result", action="store_true")
    args = parser.parse_args()
    times: dict[str, list[float]] = {kind: [] for kind in COMMANDS}
    for _ in range(args.repeat):
        for kind in COMMANDS:
            times[kind].append(run_once(kind, args))
    print(f"drain of {args.tasks} no-op tasks, -P {args.pool} -c {args.concurrency}, "
          f"{'ignore_result' if args.ignore_result else 'results stored'} (Redis)")
    rates = {}
    for kind, samples in times.items():
        median = statistics.median(samples)
        rates[kind] = args.tasks / median
        print(f"  {kind:9s} median {median:7.2f}s  {rates[kind]:8.0f} tasks/s  "
              f"(runs: {', '.join(f'{s:.2f}' for s in samples)})")
    print(f"  ratio ccworker/celery: {rates['ccworker'] / rates['celery']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
