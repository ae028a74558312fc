"""``--log-format json``: the worker's log lines as one JSON object each.

Logging stays Celery's (``app.log.setup``: levels, ``--logfile``,
``worker_hijack_root_logger``, the ``setup_logging`` family of signals);
only the formatter of the handlers Celery installed is replaced, from
``after_setup_logger`` / ``after_setup_task_logger`` receivers. So:

* a project that configures logging itself (a ``setup_logging`` receiver)
  keeps its own format: Celery sends neither signal then;
* handlers a project adds in its own ``after_setup_*`` receivers keep their
  formatters (only Celery's ``ColorFormatter``/``TaskFormatter`` are swapped);
* prefork children that set logging up again (``%i`` in ``--logfile``)
  get JSON too, since the receivers fire in them as well.

One line per record, keys in a fixed order: ``time`` (UTC, ISO 8601, ms),
``level``, ``logger``, ``message``, ``process`` (name), ``pid``,
``hostname`` (the nodename), and when known ``task_id`` and ``task_name``
(from the running task, or from the ``data`` Celery's worker attaches to
its ``received``/``succeeded`` lines), then ``data`` and ``exc_info``.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from celery import signals
from celery.utils.log import ColorFormatter

_RECEIVERS: list[Any] = []


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring)."""

    def __init__(self, hostname: str | None = None) -> None:
        super().__init__()
        self.hostname = hostname

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.processName,
            "pid": record.process,
        }
        if self.hostname:
            entry["hostname"] = self.hostname
        task_id, task_name = _task_of(record)
        if task_id is not None:
            entry["task_id"] = task_id
            entry["task_name"] = task_name
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            entry["data"] = data
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _task_of(record: logging.LogRecord) -> tuple[Any, Any]:
    """The task a record is about: the running one, else the ``data`` of the line."""
    from celery._state import get_current_task  # as Celery's own TaskFormatter

    task = get_current_task()
    if task is not None and task.request is not None and task.request.id is not None:
        return task.request.id, task.name
    data = getattr(record, "data", None)
    if isinstance(data, dict) and data.get("id") is not None:
        return data.get("id"), data.get("name")
    return None, None


def use_json(logger: logging.Logger, hostname: str | None) -> None:
    """Swap the formatter of every Celery-formatted handler of ``logger``."""
    for handler in logger.handlers:
        if isinstance(handler.formatter, ColorFormatter):
            handler.setFormatter(JsonFormatter(hostname))


def install(hostname: str | None) -> None:
    """Turn JSON on for the logging ``app.log.setup`` is about to configure.

    Call before ``app.log.setup``. The receivers are kept referenced here
    (Celery's signals hold them weakly by default).
    """

    def on_logger(sender: Any = None, logger: logging.Logger | None = None,
                  **kwargs: Any) -> None:
        if logger is not None:
            use_json(logger, hostname)
        use_json(logging.getLogger("multiprocessing"), hostname)

    def on_task_logger(sender: Any = None, logger: logging.Logger | None = None,
                       **kwargs: Any) -> None:
        if logger is not None:
            use_json(logger, hostname)

    signals.after_setup_logger.connect(on_logger, weak=False)
    signals.after_setup_task_logger.connect(on_task_logger, weak=False)
    _RECEIVERS.extend((on_logger, on_task_logger))


def uninstall() -> None:
    """Disconnect what `install` connected (tests)."""
    while _RECEIVERS:
        receiver = _RECEIVERS.pop()
        signals.after_setup_logger.disconnect(receiver)
        signals.after_setup_task_logger.disconnect(receiver)
