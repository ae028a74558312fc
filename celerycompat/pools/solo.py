"""The solo pool: the task runs in the consumer's own thread, one at a time.

As with Celery's solo pool, nothing else (not even the broker connection)
is served while a task runs; it is the simplest and the cheapest pool.
"""

from __future__ import annotations

import os

from celery import signals

from celerycompat.execution.runner import TaskRunner
from celerycompat.pools.base import OnDone, run_guarded
from celerycompat.protocol.message import TaskMessage


class SoloPool:
    name = "celery.concurrency.solo:TaskPool"
    runs_inline = True

    def __init__(self, runner: TaskRunner, hostname: str) -> None:
        self.limit = 1
        self.runner = runner
        self.hostname = hostname

    def start(self) -> None:
        # Celery's solo pool sends worker_process_init (sender = nodename):
        # projects use it to open per-process resources.
        signals.worker_process_init.send(sender=self.hostname)

    def apply(self, task_name: str, message: TaskMessage, on_done: OnDone) -> None:
        run_guarded(self.runner, task_name, message, on_done)

    def info(self) -> dict:
        """The ``pool`` section of ``inspect stats``, as Celery's solo pool reports it."""
        return {"implementation": self.name, "max-concurrency": 1,
                "processes": [os.getpid()], "max-tasks-per-child": None,
                "put-guarded-by-semaphore": True, "timeouts": []}

    def pid_for(self, task_id: str) -> int:
        """Tasks run in this process (Celery reports a thread ident here, B38 FLAG)."""
        return os.getpid()

    def stop(self, wait: bool = True) -> None:
        """Nothing runs in the background, so there is nothing to stop."""
