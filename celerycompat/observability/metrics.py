"""The Prometheus side of the worker's metrics, on ``prometheus_client``.

``prometheus_client`` is the library every Python exporter uses (Flower and
Dramatiq included): it writes the exposition format and keeps counters and
histograms thread-safe. This module adds the two things a worker needs on
top of it:

* `CallbackGauges`: gauges read when Prometheus scrapes (reserved, active,
  prefetch...), from callbacks, so the consumer never does anything for
  them;
* `ProjectMetrics`: the project's own metrics (what its tasks and signal
  receivers register in ``prometheus_client``'s default registry), served on
  the worker's endpoint. Under prefork the tasks run in child processes, so
  their metrics are only visible through ``prometheus_client``'s
  multiprocess mode: with ``PROMETHEUS_MULTIPROC_DIR`` set, the children's
  files are read and added up (the gunicorn recipe of its documentation).

`exposition` renders a registry in the text format (version 0.0.4).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

#: What `exposition` writes: the 0.0.4 text format (our names need none of
#: 1.0.0's quoting), the type ``prometheus_client``'s own server sends with it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Task runtimes span milliseconds to hours: Prometheus' default buckets
#: (5 ms to 10 s) and a tail up to an hour for batch work.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 300.0, 900.0, 3600.0)

#: The environment variable that turns on ``prometheus_client``'s
#: multiprocess mode (read by the library itself at import time).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class CallbackGauges:
    """Gauges whose values are read from callbacks at every scrape.

    A callback returns a number for an unlabelled gauge, or a mapping of
    label-value tuples to numbers. It runs on the scraping thread: it must
    only read.
    """

    def __init__(self) -> None:
        self._gauges: list[tuple[str, str, Sequence[str], Callable[[], Any]]] = []

    def add(self, name: str, documentation: str, callback: Callable[[], Any],
            labels: Sequence[str] = ()) -> None:
        self._gauges.append((name, documentation, tuple(labels), callback))

    def collect(self) -> Iterator[Metric]:
        for name, documentation, labels, callback in list(self._gauges):
            value = callback()
            if not labels:
                yield GaugeMetricFamily(name, documentation, value=float(value))
                continue
            family = GaugeMetricFamily(name, documentation, labels=labels)
            for key, number in sorted(dict(value).items()):
                family.add_metric([str(part) for part in key], float(number))
            yield family


class ProjectMetrics:
    """The project's own metrics, minus the worker's (``prefix``).

    Without multiprocess mode: ``prometheus_client``'s default registry of
    this process (threads, solo and gevent pools run the tasks here). With
    it: every process's files, added up by ``MultiProcessCollector``; the
    worker's own families are left out, as ``prometheus_client`` writes
    them to those files too when the mode is on.
    """

    def __init__(self, prefix: str, multiproc_dir: str | None = None) -> None:
        self.prefix = prefix
        self.multiproc_dir = multiproc_dir
        self._source: Any = None

    def _collectors(self) -> Iterable[Any]:
        if self._source is None:
            if self.multiproc_dir:
                from prometheus_client import multiprocess

                registry = CollectorRegistry(auto_describe=False)
                multiprocess.MultiProcessCollector(registry, path=self.multiproc_dir)
                self._source = registry
            else:
                from prometheus_client import REGISTRY

                self._source = REGISTRY
        return (self._source,)

    def collect(self) -> Iterator[Metric]:
        for source in self._collectors():
            for family in source.collect():
                if not family.name.startswith(self.prefix):
                    yield family


def multiproc_dir() -> str | None:
    """``PROMETHEUS_MULTIPROC_DIR`` when the project runs in that mode."""
    return os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()) or None


def exposition(registry: CollectorRegistry) -> bytes:
    """``registry`` in Prometheus' text format (``CONTENT_TYPE``)."""
    return generate_latest(registry)
