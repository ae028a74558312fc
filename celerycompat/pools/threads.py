"""The threads pool: ``-P threads -c N`` runs tasks in N worker threads.

Tasks go through one queue to long-lived threads (no per-task thread or
future allocation). Completion is reported through ``on_done``, so the
pool needs no result plumbing of its own.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

from celerycompat.execution.runner import TaskRunner
from celerycompat.pools.base import OnDone, run_guarded
from celerycompat.protocol.message import TaskMessage

_STOP = object()


class ThreadPool:
    name = "celery.concurrency.thread:TaskPool"
    runs_inline = False

    def __init__(self, runner: TaskRunner, limit: int) -> None:
        self.runner = runner
        self.limit = max(1, int(limit))
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.limit):
            thread = threading.Thread(
                target=self._work, name=f"ThreadPoolExecutor-0_{index}", daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        runner = self.runner
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            run_guarded(runner, *job)

    def apply(self, task_name: str, message: TaskMessage, on_done: OnDone) -> None:
        self._jobs.put((task_name, message, on_done))

    def info(self) -> dict:
        """The ``pool`` section of ``inspect stats``, as Celery's threads pool reports it."""
        return {"implementation": self.name, "max-concurrency": self.limit,
                "threads": len(self._threads)}

    def pid_for(self, task_id: str) -> int:
        """Tasks run in this process (Celery reports a thread ident here, B38 FLAG)."""
        return os.getpid()

    def stop(self, wait: bool = True) -> None:
        for _ in self._threads:
            self._jobs.put(_STOP)
        if wait:
            for thread in self._threads:
                thread.join()
        self._threads.clear()
