"""A producer for the mixed cluster: sends tasks, says which worker ran them.

An ordinary Celery client (the project's own app, ``.delay()``), so it
cannot tell a ``celery worker`` from a ``ccworker``: the tally it prints
shows both kinds taking work from the same queue. Used by the ``producer``
service of docker/compose.yaml and by docker/cluster.py.

    python producer.py [--batch 10] [--interval 2] [--work 0.05] [--rounds 0]

The broker and the result backend come from ``BROKER_URL`` and
``RESULT_BACKEND``, as for the workers (proj/celery.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Callable, Optional


class Producer:
    """Sends rounds of tasks and keeps a tally of who ran them."""

    def __init__(self, batch: int = 10, work: float = 0.05, timeout: float = 60.0) -> None:
        from proj.celery import app  # shared_task binds to the current app

        app.set_current()
        self.app = app
        self.batch = batch
        self.work = work
        self.timeout = timeout
        #: Tasks completed per worker nodename.
        self.tally: Counter[str] = Counter()
        self.failures_seen = 0

    def round(self) -> Counter[str]:
        """One round: ``batch`` whoami tasks, one add, one failing divide; wait for all."""
        from proj.tasks import add, divide, whoami

        results = [whoami.delay(self.work) for _ in range(self.batch)]
        summed = add.delay(2, 3)
        failing = divide.delay(1, 0)
        done: Counter[str] = Counter(r.get(timeout=self.timeout)["worker"] for r in results)
        assert summed.get(timeout=self.timeout) == 5
        try:
            failing.get(timeout=self.timeout)
        except ZeroDivisionError:
            self.failures_seen += 1
        self.tally.update(done)
        return done

    def summary(self) -> str:
        total = sum(self.tally.values())
        parts = ", ".join(f"{name}: {count}" for name, count in sorted(self.tally.items()))
        return f"tasks done: {total} ({parts})"


def run(producer: Producer, interval: float, rounds: int = 0,
        should_stop: Callable[[], bool] = lambda: False,
        report: Optional[Callable[[str], None]] = None) -> None:
    """Send rounds every ``interval`` seconds until ``rounds`` (0: forever) or told to stop."""
    report = report or (lambda line: print(line, flush=True))
    done = 0
    while not should_stop() and (rounds == 0 or done < rounds):
        producer.round()
        done += 1
        report(producer.summary())
        deadline = time.monotonic() + interval
        while not should_stop() and time.monotonic() < deadline:
            time.sleep(0.1)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=10, help="whoami tasks per round")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between rounds")
    parser.add_argument("--work", type=float, default=0.05, help="seconds each task sleeps")
    parser.add_argument("--rounds", type=int, default=0, help="stop after this many (0: never)")
    args = parser.parse_args(argv)
    producer = Producer(batch=args.batch, work=args.work)
    try:
        run(producer, args.interval, args.rounds)
    except KeyboardInterrupt:
        pass
    print(producer.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
