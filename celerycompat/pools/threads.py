"""The threads pool: ``-P threads -c N`` runs tasks in N worker threads.

Jobs go through one queue to long-lived threads (no per-task thread or
future allocation). Completion is reported by the job itself, so the pool
needs no result plumbing.
"""

from __future__ import annotations

import logging
import queue
import threading

from celerycompat.pools.base import Job

logger = logging.getLogger(__name__)

_STOP = object()


class ThreadPool:
    name = "celery.concurrency.thread:TaskPool"
    runs_inline = False

    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for index in range(self.limit):
            thread = threading.Thread(
                target=self._work, name=f"ThreadPoolExecutor-0_{index}", daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            try:
                job()
            except BaseException:  # a job must never kill its slot
                logger.critical("Unhandled error in a pool thread", exc_info=True)

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def stop(self, wait: bool = True) -> None:
        for _ in self._threads:
            self._jobs.put(_STOP)
        if wait:
            for thread in self._threads:
                thread.join()
        self._threads.clear()
