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


@app.task
def noop():
    return None
