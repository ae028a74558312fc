"""A start that fails part way leaves nothing running (worker.py, ``Worker.run``)."""

from __future__ import annotations

import pytest

from celerycompat.worker import Worker


class Part:
    def __init__(self, calls: list, name: str, fails: bool = False) -> None:
        self.calls, self.name, self.fails = calls, name, fails

    def close(self) -> None:
        self._stopped("close")

    def stop(self, wait: bool = True) -> None:
        self._stopped(f"stop(wait={wait})")

    def _stopped(self, how: str) -> None:
        self.calls.append(f"{self.name}.{how}")
        if self.fails:
            raise RuntimeError(f"{self.name} would not stop")


def test_a_failed_setup_stops_what_it_started():
    """Before, ``run`` called ``setup`` outside the ``try`` that tears the
    parts down: a failure after the pool started left its processes (and a
    beat child, a metrics server) running."""
    calls: list[str] = []
    worker = Worker.__new__(Worker)
    worker.beat = Part(calls, "beat")
    worker.consumer = Part(calls, "consumer", fails=True)  # one failing does not stop the rest
    worker.pool = Part(calls, "pool")
    worker.observability = Part(calls, "observability")

    def setup() -> None:
        raise SystemExit(1)

    worker.setup = setup
    with pytest.raises(SystemExit):
        worker.run()
    assert calls == ["beat.stop(wait=True)", "consumer.close", "pool.stop(wait=False)",
                     "observability.stop(wait=True)"]
    assert worker.beat is None
