"""``-D/--detach``: start the worker as a background process, as ``celery worker -D``.

Celery's worker command, once the app is loaded and the trailing
``key=value`` settings are applied (before ``celeryd_init`` or anything of
the worker), daemonizes with Celery's own ``celery.platforms.detached``:
privileges dropped (``--uid``/``--gid``), fork, ``setsid``, fork again (the
command returns 0 at once), ``chdir`` to the working directory, ``--umask``,
the log file opened once (so an unwritable one fails before the output is
gone) and the pidfile checked for a live owner, every other descriptor
closed and stdin/stdout/stderr sent to ``/dev/null``. Then it ``exec``\\ s
the same command line without ``-D`` (``--executable`` names another
Python), and that process is an ordinary worker: it writes the pidfile,
logs to ``--logfile`` and removes the pidfile when it stops.

ccworker does the same, with one difference: Celery strips ``--uid`` and
``--gid`` from the command it runs but leaves their values behind, so a
detached ``--uid 1000`` worker gets a stray ``1000`` argument; ccworker
removes the values too (the privileges are already dropped).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Optional, Sequence

logger = logging.getLogger("celery.bin.worker")

#: Flags that make the worker detach; not passed on to the detached worker.
DETACH_FLAGS = ("-D", "--detach")
#: Flags with a value that are applied while detaching; not passed on either.
APPLIED_FLAGS = ("--uid", "--gid")


def detached_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` (without the program name) for the detached worker: no
    ``-D``/``--detach``, no ``--uid``/``--gid`` and their values; the rest,
    trailing ``key=value`` settings included, unchanged and in order."""
    out: list[str] = []
    skip_value = False
    for index, arg in enumerate(argv):
        if skip_value:
            skip_value = False
            continue
        if arg == "--":
            out.extend(argv[index:])
            break
        if arg in DETACH_FLAGS:
            continue
        if arg in APPLIED_FLAGS:
            skip_value = True
            continue
        if arg.startswith(tuple(flag + "=" for flag in APPLIED_FLAGS)):
            continue
        out.append(arg)
    return out


def detach(argv: Sequence[str], args: dict[str, Any], app: Any,
           executable: Optional[str] = None) -> int:
    """Daemonize and run the worker command line ``argv`` (without ``-D``).

    Returns only in the process that failed to ``exec`` (1, after Celery's
    ``Can't exec`` line in the log file); the command that called it has
    exited 0 inside ``detached`` by then, as Celery's does.
    """
    from celery.platforms import EX_FAILURE, detached
    from celery.utils.nodenames import node_format

    hostname = args.get("hostname")
    logfile = node_format(args.get("logfile"), hostname)
    path = executable or args.get("executable") or sys.executable
    command = [path, "-m", "celerycompat", *detached_argv(argv)]
    with detached(logfile, args.get("pidfile"), args.get("uid"), args.get("gid"),
                  args.get("umask"), None, _fake(), after_forkers=False):
        try:
            os.execv(path, command)
        except Exception:
            app.log.setup_logging_subsystem("ERROR", logfile, hostname=hostname)
            logger.critical("Can't exec %r", " ".join(command), exc_info=True)
            return EX_FAILURE
    return EX_FAILURE  # not reached: exec or the except above


def restart() -> None:
    """SIGHUP's restart, as Celery's ``_reload_current_worker``: every
    descriptor but stdin/stdout/stderr closed, then the same command line
    ``exec``\\ ed (as ``python -m celerycompat``, which ``ccworker``, a
    detached worker and ``python -m celerycompat`` all are)."""
    from celery.platforms import close_open_fds

    close_open_fds([sys.__stdin__, sys.__stdout__, sys.__stderr__])
    os.execv(sys.executable, [sys.executable, "-m", "celerycompat", *sys.argv[1:]])


def _fake() -> bool:
    """``C_FAKEFORK``: Celery's switch to run ``-D`` in the foreground (debugging)."""
    return bool(os.environ.get("C_FAKEFORK"))
