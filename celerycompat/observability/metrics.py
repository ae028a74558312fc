"""Metric families and the Prometheus text exposition format (version 0.0.4).

Pure: no I/O, no knowledge of the worker. Counters and histograms are
updated by the consumer thread and read by the HTTP thread, so every update
and every snapshot takes the registry's one lock (a few hundred nanoseconds
per task); gauges are read through callbacks at scrape time, outside the
lock, so the consumer never does anything for them.

Why our own and not ``prometheus_client``: ccworker is installed into the
user's environment next to their project; the format is small and stable
(https://prometheus.io/docs/instrumenting/exposition_formats/), and what
we need of it (counters, callback gauges, histograms, labels) is the ~200
lines below. The unit tests check our output with ``prometheus_client``'s
own parser.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
from typing import Callable, Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Labels = tuple[str, ...]
Sample = tuple[str, Sequence[tuple[str, str]], float]
"""(metric name with suffix, label pairs, value)."""


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers without a point,
    ``+Inf``/``-Inf``/``NaN`` spelled out, other floats by ``repr``."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(value)


def format_bound(bound: float) -> str:
    """A bucket's ``le`` label: always a float (``1.0``, ``0.005``, ``+Inf``)."""
    if math.isinf(bound):
        return "+Inf"
    return repr(float(bound))


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


class Family:
    """One metric name with its help text, type and label names."""

    kind = "untyped"

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        if not _NAME.match(name):
            raise ValueError(f"invalid metric name {name!r}")
        for label in labels:
            if not _LABEL.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"invalid label name {label!r}")
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self.lock = threading.Lock()  # replaced by the registry's own

    def _key(self, values: Sequence[str]) -> Labels:
        if len(values) != len(self.labels):
            raise ValueError(f"{self.name} takes labels {self.labels}, got {tuple(values)}")
        return tuple(str(v) for v in values)

    def _pairs(self, key: Labels) -> list[tuple[str, str]]:
        return list(zip(self.labels, key))

    def samples(self) -> list[Sample]:
        raise NotImplementedError


class Counter(Family):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labels)
        self._values: dict[Labels, float] = {}

    def inc(self, *labels: str, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        with self.lock:
            self._values[key] = self._values.get(key, 0) + amount

    def value(self, *labels: str) -> float:
        with self.lock:
            return self._values.get(self._key(labels), 0)

    def samples(self) -> list[Sample]:
        with self.lock:
            items = sorted(self._values.items())
        return [(self.name, self._pairs(key), value) for key, value in items]


class Gauge(Family):
    """A value read when the metrics are rendered (``callback``), never stored.

    ``callback`` returns a number for an unlabelled gauge, or a mapping of
    label-value tuples to numbers. It runs on the scraping thread: it must
    only read.
    """

    kind = "gauge"

    def __init__(self, name: str, documentation: str,
                 callback: Callable[[], object], labels: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, labels)
        self.callback = callback

    def samples(self) -> list[Sample]:
        value = self.callback()
        if not self.labels:
            return [(self.name, [], float(value))]  # type: ignore[arg-type]
        items = sorted((self._key(k), v) for k, v in dict(value).items())  # type: ignore[call-overload]
        return [(self.name, self._pairs(key), float(v)) for key, v in items]


#: Task runtimes span milliseconds to hours: Prometheus' default buckets
#: (5 ms to 10 s) and a tail up to an hour for batch work.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 300.0, 900.0, 3600.0)


class Histogram(Family):
    """Observations counted into cumulative ``le`` buckets, with sum and count."""

    kind = "histogram"

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = (),
                 buckets: Iterable[float] = DEFAULT_BUCKETS) -> None:
        super().__init__(name, documentation, labels)
        bounds = sorted(float(b) for b in buckets if not math.isinf(float(b)))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError("buckets must be distinct finite numbers")
        self.bounds = tuple(bounds)
        #: Per label set: [count per bucket (+Inf last, not cumulative), sum].
        self._data: dict[Labels, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        index = bisect.bisect_left(self.bounds, value)  # le: value <= bound
        with self.lock:
            data = self._data.get(key)
            if data is None:
                data = self._data[key] = ([0] * (len(self.bounds) + 1), [0.0])
            data[0][index] += 1
            data[1][0] += value

    def samples(self) -> list[Sample]:
        with self.lock:
            items = sorted((key, (list(counts), total[0]))
                           for key, (counts, total) in self._data.items())
        out: list[Sample] = []
        for key, (counts, total) in items:
            pairs = self._pairs(key)
            running = 0
            for bound, count in zip((*self.bounds, math.inf), counts):
                running += count
                out.append((f"{self.name}_bucket", [*pairs, ("le", format_bound(bound))],
                            running))
            out.append((f"{self.name}_sum", pairs, total))
            out.append((f"{self.name}_count", pairs, running))
        return out


class Registry:
    """The families one worker exposes, rendered in registration order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, Family] = {}

    def register(self, family: Family) -> Family:
        if family.name in self._families:
            raise ValueError(f"{family.name} is registered already")
        family.lock = self._lock
        self._families[family.name] = family
        return family

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return self.register(Counter(name, documentation, labels))  # type: ignore[return-value]

    def gauge(self, name: str, documentation: str, callback: Callable[[], object],
              labels: Sequence[str] = ()) -> Gauge:
        return self.register(Gauge(name, documentation, callback, labels))  # type: ignore[return-value]

    def histogram(self, name: str, documentation: str, labels: Sequence[str] = (),
                  buckets: Iterable[float] = DEFAULT_BUCKETS) -> Histogram:
        return self.register(Histogram(name, documentation, labels, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        """Every family as Prometheus text: ``# HELP``, ``# TYPE``, samples."""
        lines: list[str] = []
        for family in list(self._families.values()):
            lines.append(f"# HELP {family.name} {escape_help(family.documentation)}")
            lines.append(f"# TYPE {family.name} {family.kind}")
            for name, pairs, value in family.samples():
                if pairs:
                    labels = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in pairs)
                    lines.append(f"{name}{{{labels}}} {format_value(value)}")
                else:
                    lines.append(f"{name} {format_value(value)}")
        return "\n".join(lines) + "\n"
