"""No-op drain, side by side: how fast does a worker empty a queue of N tasks?

Pre-queues N ``noop`` tasks, starts the worker (``celery worker`` or
``ccworker``, same flags), and times from start until the last result is
stored (or, with ``--ignore-result``, until the queue and the worker's
reservations are empty). Kinds alternate and repeat; medians and ratios are
printed. Run from the repository root::

    .venv/bin/python benchmarks/drain.py --tasks 5000 --repeat 3 --pool threads -c 4

``--kinds ccworker`` runs one side only (to compare two versions of
ccworker back to back); every run also reports the CPU the worker process
tree used per task (user + system, from ``wait4``), a steadier figure than
the wall clock on a noisy machine. ``--workers 2 --pool solo -c 1`` runs
two solo workers on the queue at once: what a prefork pool whose children
fetched, acked and wrote for themselves could reach at best
(docs/performance.md).

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

from proctree import cpu_seconds_at_exit

HERE = os.path.dirname(os.path.abspath(__file__))
COMMANDS = {
    "celery": [sys.executable, "-m", "celery", "-A", "bench_proj", "worker"],
    "ccworker": [sys.executable, "-m", "celerycompat", "-A", "bench_proj", "worker"],
}


def run_once(kind: str, args: argparse.Namespace) -> float:
    import redis

    queue = f"bench-{uuid.uuid4().hex[:8]}"
    # BENCH_CCWORKER_PATH: a directory holding another ``celerycompat``
    # (e.g. ``git archive <rev> celerycompat | tar -x -C /tmp/before``) for
    # an A/B run of two versions with ``--kinds ccworker``.
    path = os.pathsep.join(filter(None, [os.environ.get("BENCH_CCWORKER_PATH"), HERE]))
    env = dict(os.environ, BENCH_QUEUE=queue, PYTHONPATH=path,
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
    workers = [subprocess.Popen(COMMANDS[kind] + _named(flags, n, args.workers), cwd=HERE,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for n in range(args.workers)]
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
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        cpu = sum(cpu_seconds_at_exit(worker, 30) for worker in workers)
        CPU[kind].append(cpu / args.tasks * 1e6)


def _named(flags: list[str], n: int, workers: int) -> list[str]:
    """The worker flags, with a node name of its own for each of ``--workers``."""
    if workers == 1:
        return flags
    return [flag.replace("@%h", f"-{n}@%h") for flag in flags]


#: CPU microseconds per task of each run, by kind.
CPU: dict[str, list[float]] = {kind: [] for kind in COMMANDS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pool", default="threads")
    parser.add_argument("-c", "--concurrency", type=int, default=4)
    parser.add_argument("--ignore-result", action="store_true")
    parser.add_argument("--workers", type=int, default=1,
                        help="this many workers side by side on the queue (e.g. two "
                             "'-P solo' ones: the bound of a prefork pool whose "
                             "children consume for themselves)")
    parser.add_argument("--kinds", default=",".join(COMMANDS),
                        help="which workers to run, comma-separated (default: both)")
    args = parser.parse_args()
    kinds = [kind for kind in args.kinds.split(",") if kind]
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.repeat):
        for kind in kinds:
            times[kind].append(run_once(kind, args))
    each = f" x {args.workers} workers" if args.workers > 1 else ""
    print(f"drain of {args.tasks} no-op tasks, -P {args.pool} -c {args.concurrency}{each}, "
          f"{'ignore_result' if args.ignore_result else 'results stored'} (Redis)")
    rates = {}
    for kind, samples in times.items():
        median = statistics.median(samples)
        rates[kind] = args.tasks / median
        cpu = ", ".join(f"{c:.0f}" for c in CPU[kind])
        print(f"  {kind:9s} median {median:7.2f}s  {rates[kind]:8.0f} tasks/s  "
              f"(runs: {', '.join(f'{s:.2f}' for s in samples)}; CPU us/task: {cpu})")
    if "ccworker" in rates and "celery" in rates:
        print(f"  ratio ccworker/celery: {rates['ccworker'] / rates['celery']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
