"""Monkey patching for ``-P gevent`` and ``-P eventlet``, done before anything else is imported.

gevent and eventlet can only make blocking calls cooperative if the standard library is
patched before any module takes a reference to the original ``socket``,
``select``, ``threading``, ``ssl``... (kombu, for instance, picks its
poller when it is imported). ``celery`` does this in ``celery/__main__.py``:
``maybe_patch_concurrency`` reads ``-P``/``--pool`` straight from
``sys.argv`` and patches before the CLI, the app, kombu or redis are
imported. ccworker does the same at both of its entry points (the
``ccworker`` console script and ``python -m celerycompat``, which both run
`celerycompat.__main__.main`).

This module may import nothing but ``os`` and ``sys`` at module level: it
runs before the patch.

The rules, which differ from Celery's only where Celery would run a green
pool unpatched (gevent stands for eventlet too):

* ``-P gevent``, ``--pool gevent``, ``--pool=gevent`` (Celery's rules), and
  also ``-Pgevent`` (click accepts it; Celery's scan does not see it and
  runs an unpatched gevent pool);
* when the flag is given more than once the last one counts, as it does
  for click, so we patch exactly when the pool that will run is gevent
  (Celery's scan takes the first);
* arguments after ``--`` are ``key=value`` settings, not flags;
* without a flag, ``CELERY_WORKER_POOL`` (the flag's environment variable,
  which ccworker's CLI reads as Celery's does) counts too;
* ``worker_pool = "gevent"`` in the app's configuration cannot be seen this
  early: the app is not imported yet. ccworker then runs the threads pool
  with a warning (`gevent_patched` is false), unless the project patched
  the process itself.

eventlet is patched as Celery patches it: ``eventlet.monkey_patch()``, and
with ``EVENTLET_NOBLOCK=<seconds>`` eventlet's own blocking detection.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional, Sequence

#: The environment variable of ``-P`` (click's ``auto_envvar_prefix``).
POOL_ENV = "CELERY_WORKER_POOL"
SHORT = "-P"
LONG = "--pool"


def pool_from_argv(argv: Sequence[str]) -> Optional[str]:
    """The ``-P``/``--pool`` value on a command line (without the program
    name), the last one if given several times; ``None`` if absent."""
    found = None
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        following = args[i + 1] if i + 1 < len(args) else None
        if arg in (SHORT, LONG):
            if following is not None:
                found = following
        elif arg.startswith(LONG + "="):
            found = arg[len(LONG) + 1:]
        elif arg.startswith(SHORT) and not arg.startswith("--"):
            found = arg[len(SHORT):]
    return found


def requested_pool(argv: Sequence[str],
                   environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The pool asked for on the command line, else by ``CELERY_WORKER_POOL``."""
    pool = pool_from_argv(argv)
    if pool is None:
        env = os.environ if environ is None else environ
        pool = env.get(POOL_ENV) or None
    return pool


def maybe_patch_concurrency(argv: Optional[Sequence[str]] = None,
                            environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Patch the process for gevent or eventlet if that is the pool asked for.

    Returns the name of the pool patched for, or ``None``. Call it before
    importing anything that uses sockets or threads.
    """
    pool = requested_pool(sys.argv[1:] if argv is None else argv, environ)
    if pool == "gevent":
        _patch_gevent()
        return pool
    if pool == "eventlet":
        _patch_eventlet()
        return pool
    return None


#: What ``-P gevent`` / ``-P eventlet`` print when the library is not
#: installed (each is an extra: only its pool needs it).
GEVENT_MISSING = ("ccworker: -P gevent needs the gevent package, which is not installed: "
                  "pip install 'celerycompat[gevent]'")
EVENTLET_MISSING = ("ccworker: -P eventlet needs the eventlet package, which is not "
                    "installed: pip install 'celerycompat[eventlet]'")


def _patch_gevent() -> None:
    try:
        from gevent import monkey
    except ImportError:
        sys.stderr.write(GEVENT_MISSING + "\n")
        raise SystemExit(1) from None
    monkey.patch_all()


def _patch_eventlet() -> None:
    try:
        import eventlet
        import eventlet.debug
    except ImportError:
        sys.stderr.write(EVENTLET_MISSING + "\n")
        raise SystemExit(1) from None
    eventlet.monkey_patch()
    try:
        blockdetect = float(os.environ.get("EVENTLET_NOBLOCK", 0))
    except ValueError:
        blockdetect = 0.0
    if blockdetect:
        eventlet.debug.hub_blocking_detection(blockdetect, blockdetect)


def eventlet_patched() -> bool:
    """True if this process runs with eventlet's patches (ours or the project's)."""
    patcher = sys.modules.get("eventlet.patcher")
    return patcher is not None and bool(patcher.is_monkey_patched("socket"))


def green_patched(pool: str) -> bool:
    """True if the process is patched for the green ``pool`` (``gevent``, ``eventlet``)."""
    return gevent_patched() if pool == "gevent" else eventlet_patched()


def gevent_patched() -> bool:
    """True if this process runs with gevent's patches (ours or the project's).

    The gevent pool needs them: unpatched, the consumer's wait on the
    broker socket would block every task greenlet.
    """
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))
