"""Logging for ccworker, done by the app's own ``app.log`` as in ``celery worker``.

Going through ``app.log.setup`` rather than configuring ``logging`` here is
what keeps a drop-in honest: the ``setup_logging`` signal (projects that
bring their own logging config), ``after_setup_logger`` and
``after_setup_task_logger`` fire as under Celery, ``worker_hijack_root_logger``
is honoured, the line format is ``worker_log_format`` /
``worker_task_log_format``, and ``--logfile`` is node-formatted by Celery.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("celerycompat.cli")


def colorize_for(no_color: bool | None) -> bool | None:
    """Celery's worker passes ``colorize = not no_color`` whenever ``-C`` is
    known (it always is from the CLI); ``app.log`` then still disables colour
    for a log file or a non-tty stderr."""
    return None if no_color is None else not no_color


def setup_logging(options: Any) -> bool:
    """Configure logging for a worker; True if a ``setup_logging`` receiver
    took over (then Celery does not redirect stdout/stderr either).

    ``options`` is a :class:`celerycompat.options.WorkerOptions`. The log
    file template is passed unexpanded together with the nodename, because
    ``app.log`` expands ``%n``/``%i``/... itself.
    """
    json_lines = getattr(getattr(options, "observability", None), "log_format", "") == "json"
    if json_lines:
        # Receivers of Celery's after_setup_* signals swap the formatters.
        from celerycompat.observability import jsonlog

        jsonlog.install(options.nodename)
    handled = options.app.log.setup(
        loglevel=options.loglevel,
        logfile=options.logfile,
        redirect_stdouts=False,
        colorize=False if json_lines else colorize_for(options.no_color),
        hostname=options.nodename,
    )
    if handled and json_lines:
        logger.warning("ccworker: --log-format json has no effect: the project "
                       "configures logging itself (a setup_logging receiver)")
    return bool(handled)


def redirect_stdouts(options: Any, custom_logging: bool) -> None:
    """Send ``print`` output of task code to the log, like Celery's worker.

    Celery does this once the worker starts, unless a ``setup_logging``
    receiver configured logging or ``worker_redirect_stdouts`` is off; the
    level is ``worker_redirect_stdouts_level`` (WARNING).
    """
    conf = options.app.conf
    if custom_logging or not conf.worker_redirect_stdouts:
        return
    options.app.log.redirect_stdouts(conf.worker_redirect_stdouts_level)


def restore_stdouts() -> None:
    """Undo `redirect_stdouts` once the worker is over (whatever comes after
    it is not task output)."""
    import sys

    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__


def warn_unsupported(lines: list[str]) -> None:
    """Log each accepted-but-ignored flag once, at WARNING, after logging is
    set up (so the lines land where the operator reads the worker log)."""
    for line in lines:
        logger.warning("%s", line)
