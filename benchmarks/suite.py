"""The performance table in one command: ccworker, ``celery worker`` (and Dramatiq) side by side.

Every scenario runs each kind in turn, ``--repeat`` times, alternating, on
the same machine, broker and project (``bench_proj``), and prints the median
of each figure and the ratio ccworker / Celery. Run from the repository root::

    .venv/bin/python benchmarks/suite.py                 # every scenario
    .venv/bin/python benchmarks/suite.py drain-results latency --repeat 5

Scenarios (issue 8):

* ``drain-results``: N pre-queued no-op tasks, results stored (Redis),
  ``-P threads -c 4``; tasks/s from worker start (a backlog's view) and in
  steady state (first to last result), peak RSS of the worker tree.
* ``drain-ignore``: the same with ``ignore_result``, done when the queue and
  the worker's un-acked messages are empty; Dramatiq (one process, 4
  threads) runs the same drain.
* ``drain-solo`` / ``drain-prefork``: the results drain on ``-P solo`` and on
  ``-P prefork -c 2`` (Celery's default pool).
* ``drain-late``: the prefork drain of ``acks_late`` tasks with
  ``--prefetch-multiplier 1`` (the usual setting for long tasks), N/5 tasks.
* ``drain-amqp``: the results drain with RabbitMQ as the broker.
* ``io-threads`` / ``io-gevent``: 10 ms sleeping tasks, ``-c 50`` / ``-c 200``.
* ``prefork-cpu``: a ~2 ms CPU task on ``-P prefork -c 2``.
* ``latency``: an idle worker, one task at a time, client-side round trip
  p50/p90/p99 (ms).
* ``startup``: seconds from start to the first task done, with mingle,
  gossip and heartbeats on (Celery's defaults), and idle RSS of the tree.
* ``eta-hold``: twice ``--tasks`` tasks with a one-hour countdown: seconds
  until all are held, the RSS holding them, and the warm shutdown that
  returns them (each run checks that every one came back).

Tests never assert on time; figures go to docs/performance.md with the
command that produced them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any, Callable

import redis
from proctree import cpu_seconds_at_exit, tree_rss_kib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

REDIS_BROKER = "redis://127.0.0.1:6379/12"
RESULTS = "redis://127.0.0.1:6379/13"
AMQP_BROKER = os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
QUIET = ["-l", "WARNING", "--without-mingle", "--without-gossip", "--without-heartbeat"]


# -- processes -------------------------------------------------------------------


def command(kind: str, pool: str, concurrency: int, queue: str, flags: list[str]) -> list[str]:
    if kind == "dramatiq":
        return [sys.executable, "-m", "dramatiq", "bench_dramatiq", "-p", "1",
                "-t", str(concurrency), "-Q", queue]
    program = {"celery": ["-m", "celery"], "ccworker": ["-m", "celerycompat"]}[kind]
    return [sys.executable, *program, "-A", "bench_proj", "worker", "-P", pool,
            "-c", str(concurrency), "-Q", queue, "-n", f"{kind}-{queue}@%h", *flags]


def start(kind: str, pool: str, concurrency: int, queue: str, env: dict,
          flags: list[str]) -> subprocess.Popen:
    # BENCH_CCWORKER_PATH: another ``celerycompat`` to time (see drain.py).
    path = HERE if kind != "ccworker" else os.pathsep.join(
        filter(None, [os.environ.get("BENCH_CCWORKER_PATH"), HERE]))
    return subprocess.Popen(command(kind, pool, concurrency, queue, flags), cwd=HERE,
                            env=dict(os.environ, **env, PYTHONPATH=path, BENCH_QUEUE=queue),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(worker: subprocess.Popen) -> float:
    """Warm shutdown; returns the CPU seconds the worker's tree used."""
    worker.send_signal(signal.SIGTERM)
    return cpu_seconds_at_exit(worker, 60)


def tree_rss_mib(pid: int) -> float:
    return tree_rss_kib(pid) / 1024


def client(broker: str, queue: str, ignore_result: bool = False) -> Any:
    os.environ.update(BENCH_BROKER=broker, BENCH_BACKEND=RESULTS, BENCH_QUEUE=queue,
                      BENCH_IGNORE_RESULT="1" if ignore_result else "0")
    from bench_proj.celery import app

    if app.conf.broker_url != broker:
        # Connection and producer pools are built for the first broker used.
        # kombu also keeps producer pools per broker URL in a global
        # registry, which would hand the closed one back on switching back.
        from kombu import pools

        app.pool.force_close_all()
        pools.reset()
        app._pool = None
        app.amqp._producer_pool = None
    app.conf.update(broker_url=broker, task_default_queue=queue,
                    task_ignore_result=ignore_result)
    return app


def queue_tasks(kind: str, app: Any, name: str, args: tuple, count: int, queue: str,
                ignore_result: bool) -> list:
    if kind == "dramatiq":
        import bench_dramatiq

        bench_dramatiq.noop.queue_name = queue
        message = bench_dramatiq.noop.message()
        broker = bench_dramatiq.broker
        for _ in range(count):
            broker.enqueue(message.copy(message_id=str(uuid.uuid4())))
        return []
    task = app.tasks[f"bench_proj.celery.{name}"]
    with app.connection_for_write() as connection:
        # Declared before the first publish: on RabbitMQ a message sent to a
        # queue that does not exist yet is dropped.
        app.amqp.queues[queue].bind(connection.default_channel).declare()
    with app.producer_or_acquire() as producer:
        return [task.apply_async(args, queue=queue, producer=producer,
                                 ignore_result=ignore_result).id for _ in range(count)]


def wait_drained(kind: str, ids: list, queue: str, worker: subprocess.Popen,
                 ignore_result: bool, broker_url: str) -> dict:
    """Poll until done; returns seconds from start, steady-state seconds and peak RSS."""
    results = redis.Redis.from_url(RESULTS)
    broker = redis.Redis.from_url(broker_url) if broker_url.startswith("redis") else None
    keys = [f"celery-task-meta-{task_id}" for task_id in ids]
    started = time.monotonic()
    first = None
    peak = 0.0
    deadline = started + 300
    while True:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{kind}: not drained after 300 s")
        peak = max(peak, tree_rss_mib(worker.pid))
        if ignore_result:
            done = _drained_ignoring(kind, broker, queue)
            if first is None and _some_taken(kind, broker, queue, len(ids)):
                first = time.monotonic()
        else:
            stored = sum(results.exists(*keys[i:i + 1000]) for i in range(0, len(keys), 1000))
            if first is None and stored:
                first = time.monotonic()
            done = stored == len(keys)
        if done:
            end = time.monotonic()
            return {"from_start": end - started, "steady": end - (first or started),
                    "peak_rss": peak}
        if worker.poll() is not None:
            raise RuntimeError(f"{kind} worker exited with {worker.returncode}")
        time.sleep(0.02)


def _drained_ignoring(kind: str, broker: Any, queue: str) -> bool:
    if kind == "dramatiq":
        return not broker.llen(f"dramatiq:{queue}") and not broker.hlen(f"dramatiq:{queue}.msgs")
    return not broker.llen(queue) and not broker.hlen("unacked")


def _some_taken(kind: str, broker: Any, queue: str, total: int) -> bool:
    key = f"dramatiq:{queue}" if kind == "dramatiq" else queue
    return broker.llen(key) < total


# -- scenarios ---------------------------------------------------------------------


def drain(pool: str, concurrency: int, *, count: int, ignore_result: bool = False,
          broker: str = REDIS_BROKER, task: str = "noop", args: tuple = (),
          flags: tuple = (), env: dict | None = None) -> Callable:
    def run(kind: str) -> dict:
        queue = f"bench-{uuid.uuid4().hex[:8]}"
        app = client(broker, queue, ignore_result)
        if broker.startswith("redis"):
            redis.Redis.from_url(broker).delete("unacked", "unacked_index")
        ids = queue_tasks(kind, app, task, args, count, queue, ignore_result)
        worker = start(kind, pool, concurrency, queue,
                       {"BENCH_BROKER": broker,
                        "BENCH_IGNORE_RESULT": "1" if ignore_result else "0", **(env or {})},
                       [*QUIET, *flags])
        cpu = float("nan")
        try:
            figures = wait_drained(kind, ids, queue, worker, ignore_result, broker)
        finally:
            cpu = stop(worker)
            if broker.startswith("redis"):
                redis.Redis.from_url(broker).delete(queue, f"dramatiq:{queue}")
        return {"tasks/s from start": count / figures["from_start"],
                "tasks/s steady": count / figures["steady"],
                "CPU us/task": cpu / count * 1e6,
                "peak RSS MiB": figures["peak_rss"]}
    return run


def latency(pool: str, concurrency: int, samples: int = 300) -> Callable:
    def run(kind: str) -> dict:
        queue = f"bench-{uuid.uuid4().hex[:8]}"
        app = client(REDIS_BROKER, queue)
        noop = app.tasks["bench_proj.celery.noop"]
        worker = start(kind, pool, concurrency, queue, {}, QUIET)
        try:
            for _ in range(20):  # warm up (and wait until ready)
                noop.apply_async(queue=queue, ignore_result=False).get(timeout=60)
            times = []
            for _ in range(samples):
                sent = time.perf_counter()
                noop.apply_async(queue=queue, ignore_result=False).get(timeout=10)
                times.append((time.perf_counter() - sent) * 1000)
        finally:
            stop(worker)
        times.sort()
        return {"p50 ms": times[len(times) // 2], "p90 ms": times[int(len(times) * 0.9)],
                "p99 ms": times[int(len(times) * 0.99)]}
    return run


def startup() -> Callable:
    def run(kind: str) -> dict:
        queue = f"bench-{uuid.uuid4().hex[:8]}"
        app = client(REDIS_BROKER, queue)
        result = app.tasks["bench_proj.celery.noop"].apply_async(queue=queue,
                                                                 ignore_result=False)
        began = time.monotonic()
        worker = start(kind, "prefork", 2, queue, {}, ["-l", "WARNING"])
        try:
            result.get(timeout=60, interval=0.005)
            first_task = time.monotonic() - began
            time.sleep(3.0)
            idle = tree_rss_mib(worker.pid)
        finally:
            stop(worker)
        return {"s to first task": first_task, "idle RSS MiB (prefork -c2)": idle}
    return run


def eta_hold(count: int) -> Callable:
    """``count`` tasks with a one-hour countdown: how long until all are held,
    the tree's RSS holding them, and how long a warm shutdown takes to give
    them back (benchmarks/eta_hold.py, which also runs on its own)."""
    import eta_hold as scenario

    options = argparse.Namespace(tasks=count, pool="threads", concurrency=4, eta_task_limit=0)

    def run(kind: str) -> dict:
        client(REDIS_BROKER, f"bench-{uuid.uuid4().hex[:8]}")  # back on Redis
        row = scenario.run_once(kind, options)
        if row["back"] != count:
            raise RuntimeError(f"{kind}: {row['back']} of {count} ETA tasks came back")
        return {"s until all held": row["held_after"], "RSS MiB holding": row["rss_mib"],
                "warm shutdown s": row["stop_seconds"]}
    return run


SCENARIOS: dict[str, tuple[str, Callable[[argparse.Namespace], Callable], tuple]] = {
    "drain-results": ("no-op drain, results stored, Redis, -P threads -c 4",
                      lambda a: drain("threads", 4, count=a.tasks), ("celery", "ccworker")),
    "drain-ignore": ("no-op drain, ignore_result, Redis, threads -c 4 (Dramatiq: -p 1 -t 4)",
                     lambda a: drain("threads", 4, count=a.tasks, ignore_result=True),
                     ("celery", "ccworker", "dramatiq")),
    "drain-solo": ("no-op drain, results stored, Redis, -P solo",
                   lambda a: drain("solo", 1, count=a.tasks), ("celery", "ccworker")),
    "drain-prefork": ("no-op drain, results stored, Redis, -P prefork -c 2",
                      lambda a: drain("prefork", 2, count=a.tasks), ("celery", "ccworker")),
    "drain-late": ("no-op drain, acks_late, --prefetch-multiplier 1, Redis, -P prefork -c 2",
                   lambda a: drain("prefork", 2, count=a.tasks // 5,
                                   flags=("--prefetch-multiplier", "1"),
                                   env={"BENCH_ACKS_LATE": "1"}), ("celery", "ccworker")),
    "drain-amqp": ("no-op drain, results stored (Redis), RabbitMQ broker, -P threads -c 4",
                   lambda a: drain("threads", 4, count=a.tasks, broker=AMQP_BROKER),
                   ("celery", "ccworker")),
    "io-threads": ("10 ms I/O tasks, -P threads -c 50, results stored",
                   lambda a: drain("threads", 50, count=a.tasks // 5, task="sleepy",
                                   args=(0.01,)), ("celery", "ccworker")),
    "io-gevent": ("10 ms I/O tasks, -P gevent -c 200, results stored",
                  lambda a: drain("gevent", 200, count=a.tasks // 5, task="sleepy",
                                  args=(0.01,)), ("celery", "ccworker")),
    "prefork-cpu": ("~2 ms CPU tasks, -P prefork -c 2, results stored",
                    lambda a: drain("prefork", 2, count=a.tasks // 5, task="cpu",
                                    args=(20000,)), ("celery", "ccworker")),
    "latency": ("round trip of one task on an idle worker (threads -c 4), Redis",
                lambda a: latency("threads", 4), ("celery", "ccworker")),
    "latency-prefork": ("round trip of one task on an idle worker (prefork -c 2), Redis",
                        lambda a: latency("prefork", 2), ("celery", "ccworker")),
    "startup": ("start to first task done, mingle/gossip/heartbeat on, prefork -c 2",
                lambda a: startup(), ("celery", "ccworker")),
    "eta-hold": ("ETA tasks held (2 x --tasks, one-hour countdown), threads -c 4, Redis",
                 lambda a: eta_hold(a.tasks * 2), ("celery", "ccworker")),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", default=list(SCENARIOS),
                        help=f"any of: {', '.join(SCENARIOS)}")
    parser.add_argument("--tasks", type=int, default=10000, help="drain size (I/O, CPU: /5)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for name in args.scenarios:
        title, make, kinds = SCENARIOS[name]
        if "dramatiq" in kinds and importlib.util.find_spec("dramatiq") is None:
            print(f"\n{name}: Dramatiq is not installed, so it is left out of this "
                  "run (pip install -e '.[bench]')", flush=True)
            kinds = tuple(kind for kind in kinds if kind != "dramatiq")
        run = make(args)
        samples: dict[str, list[dict]] = {kind: [] for kind in kinds}
        try:
            for _ in range(args.repeat):
                for kind in kinds:
                    samples[kind].append(run(kind))
        except Exception as exc:  # one scenario failing does not lose the others
            print(f"\n{name}: FAILED: {exc!r}", flush=True)
            continue
        print(f"\n{name}: {title} (medians of {args.repeat})", flush=True)
        medians = {kind: {key: statistics.median(s[key] for s in runs)
                          for key in runs[0]} for kind, runs in samples.items()}
        for key in medians["celery"]:
            row = "  ".join(f"{kind} {medians[kind][key]:9.1f}" for kind in kinds
                            if key in medians[kind])
            ratio = medians["ccworker"][key] / medians["celery"][key]
            print(f"  {key:28s} {row}   ccworker/celery {ratio:5.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
