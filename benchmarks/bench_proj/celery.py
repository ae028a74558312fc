"""Benchmark app: broker, backend and queue from the environment."""

import os

from celery import Celery

app = Celery("bench_proj")
app.conf.update(
    broker_url=os.environ.get("BENCH_BROKER", "redis://127.0.0.1:6379/12"),
    result_backend=os.environ.get("BENCH_BACKEND", "redis://127.0.0.1:6379/13"),
    task_default_queue=os.environ.get("BENCH_QUEUE", "bench"),
    task_ignore_result=os.environ.get("BENCH_IGNORE_RESULT") == "1",
)
if os.environ.get("BENCH_ACKS_LATE") == "1":
    app.conf.task_acks_late = True
if os.environ.get("BENCH_ETA_TASK_LIMIT"):
    app.conf.worker_eta_task_limit = int(os.environ["BENCH_ETA_TASK_LIMIT"])


@app.task
def noop():
    return None


@app.task
def sleepy(seconds):
    """An I/O-bound task: the threads and gevent scenarios."""
    import time

    time.sleep(seconds)


@app.task
def cpu(n):
    """A small CPU-bound task (about 2 ms for n=20000): the prefork scenario."""
    total = 0
    for i in range(n):
        total += i * i
    return total


@app.task
async def asleep(seconds):
    """The I/O-bound task as a coroutine: ``-P asyncio`` (benchmarks/async_io.py)."""
    import asyncio

    await asyncio.sleep(seconds)
