"""celeryev event documents (wire contract E1-E21). Pure: no I/O, no clock of its own.

An event is a flat dict: ``hostname, utcoffset, pid, clock``, then the
type's own fields, then ``timestamp`` and ``type`` (E4); monitors (Flower,
``celery events``) read them by name, and the order is kept so that a
capture of our events reads like one of Celery's.
"""

from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

#: Task events are batched into one ``task.multi`` message (E2); worker
#: events (heartbeats, online/offline) always go out alone.
BATCHED_GROUPS = frozenset({"task"})

#: ``inspect``-free identity fields of worker events (E5). Monitors only
#: display them; Celery sends these values.
SOFTWARE_IDENT = "py-celery"
SOFTWARE_SYSTEM = platform.system()


def group_of(event_type: str) -> str:
    """``task-received`` -> ``task`` (the text before the first ``-``)."""
    return event_type.partition("-")[0]


def routing_key(event_type: str) -> str:
    """``worker-heartbeat`` -> ``worker.heartbeat`` (E1)."""
    return event_type.replace("-", ".")


def utcoffset(localtime: Callable[[], time.struct_time] = time.localtime) -> float:
    """Hours *west* of UTC, as Celery 5.7 sends it (E21: UTC+2 -> -2.0, a float)."""
    if localtime().tm_isdst:
        return time.altzone / 3600
    return time.timezone / 3600


def make_event(event_type: str, *, hostname: str, pid: int, clock: int | None,
               timestamp: float | None = None, offset: float | None = None,
               **fields: Any) -> dict[str, Any]:
    """One event document in Celery's field order (E4)."""
    event = {
        "hostname": hostname,
        "utcoffset": utcoffset() if offset is None else offset,
        "pid": pid,
        "clock": clock,
    }
    event.update(fields)
    event["timestamp"] = time.time() if timestamp is None else timestamp
    event["type"] = event_type
    return event


def load_average() -> list[float]:
    """``loadavg`` of worker events: three floats rounded to 2 places (E5)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):  # platforms without getloadavg
        return [0.0, 0.0, 0.0]


def software_info(software_version: str | None = None) -> dict[str, str]:
    """``sw_ident``, ``sw_ver`` (Celery's version), ``sw_sys`` (E5)."""
    if software_version is None:
        import celery

        software_version = celery.__version__
    return {"sw_ident": SOFTWARE_IDENT, "sw_ver": software_version, "sw_sys": SOFTWARE_SYSTEM}


def worker_fields(*, freq: float, active: int, processed: int,
                  software_version: str | None = None) -> dict[str, Any]:
    """The fields of worker-online/-heartbeat/-offline (E5), in Celery's order."""
    return {
        "freq": freq,
        "active": active,
        "processed": processed,
        "loadavg": load_average(),
        **software_info(software_version),
    }
