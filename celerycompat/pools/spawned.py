"""Prefork children started as fresh interpreters (``--pool-start-method spawn``).

Why: a forked child inherits everything its parent holds at the fork:
threads (gone in the child, their locks possibly held), an initialised
CUDA context, gRPC channels, database pools. Libraries that cannot survive
that are why Celery 5.7 added ``worker_pool_start_method = "spawn"``
(``--pool-start-method spawn``): billiard then starts each pool process as a
new interpreter, which sets itself up from scratch.

Here the parent (`start`, called by `PreforkPool._spawn`) starts
``python -m celerycompat.pools.spawned`` with its end of the socket pair as
the one descriptor it inherits, in the parent's current directory
(``--workdir`` already entered) and environment (``--broker`` and the other
globals already exported), with a pickled `SpawnSpec` on its command line.
The child (`main`) then does what Celery's spawned pool process does
(``process_initializer`` with ``FORKED_BY_MULTIPROCESSING`` set, so
``@app.task`` binds as it does in a fresh interpreter): it loads the app as
``-A`` named it, applies the command line's ``key=value`` settings, sets
logging up as the worker did, and goes on as a forked child would
(`celerycompat.pools.child.child_main`: signals, the app's worker init,
``worker_process_init``, the job loop). What the parent did after loading
the app (``celeryd_init``, ``worker_init``, ``celeryd_after_setup`` and
their receivers' effects) is not in the child, as under Celery.
"""

from __future__ import annotations

import base64
import os
import pickle
import socket
import sys
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Optional

from celerycompat.pools.child import ChildConfig

#: What billiard's spawn context names its pool processes (``SpawnProcess``
#: with "Process" replaced by "PoolWorker").
NAME_PREFIX = "SpawnPoolWorker"


@dataclass(frozen=True)
class SpawnSpec:
    """Everything a spawned child needs to become the pool process the
    parent would have forked: plain data, pickled onto its command line."""

    child: ChildConfig
    app_spec: Optional[str]
    """``-A`` as given (None: Celery's current app)."""
    config_args: tuple[str, ...] = ()
    """The command line's trailing ``key=value`` settings."""
    hostname: str = ""
    loglevel: Optional[int] = None
    logfile: Optional[str] = None
    no_color: bool = False
    log_format: str = "text"


def announce() -> None:
    """In the parent, before the first child: as Celery's prefork pool does
    for spawn, ``FORKED_BY_MULTIPROCESSING`` in the environment every child
    (and whatever it starts) inherits."""
    os.environ["FORKED_BY_MULTIPROCESSING"] = "1"


def start(spec: SpawnSpec, sock: socket.socket) -> int:
    """Start the child for ``spec`` with ``sock`` as its end of the pair; its pid."""
    fd = sock.fileno()
    blob = base64.b64encode(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)).decode()
    argv = [sys.executable, "-m", "celerycompat.pools.spawned", str(fd), blob]
    os.set_inheritable(fd, True)
    try:
        # posix_spawn, not subprocess: the pool's supervisor reaps its
        # children with waitpid, which a Popen object must not race.
        return os.posix_spawn(sys.executable, argv, os.environ)
    finally:
        os.set_inheritable(fd, False)


def main(argv: list[str]) -> None:
    """The spawned child: set up as Celery's spawned pool process, then
    `child_main`, which never returns."""
    fd, blob = int(argv[0]), argv[1]
    spec: SpawnSpec = pickle.loads(base64.b64decode(blob))
    os.set_inheritable(fd, False)  # not into processes its tasks start
    sock = socket.socket(fileno=fd)
    # Before anything imports the project: Celery's fresh-interpreter mode
    # (the parent set FORKED_BY_MULTIPROCESSING in the environment: `announce`).
    from celery.app import base as app_base

    app_base.USING_EXECV = True
    from celerycompat import apploader
    from celerycompat.backends import result_store_for
    from celerycompat.execution import tracer
    from celerycompat.execution.runner import RunSettings, TaskRunner
    from celerycompat.pools.child import child_main

    tracer.install()  # before the project's instrumentation wraps it (cli.run)
    app = apploader.load_app(spec.app_spec)
    if spec.config_args:
        app.config_from_cmdline(list(spec.config_args), namespace="worker")
    if not (spec.logfile and "%i" in spec.logfile.lower()):
        # A per-child file (``%i``) is set up by child_main, once the
        # process has its index.
        logging_of(app, spec)
    runner = TaskRunner(app, RunSettings(hostname=spec.hostname, loglevel=spec.loglevel,
                                         logfile=spec.logfile), result_store_for)
    child_main(sock, runner, spec.child, [])


def logging_of(app: Any, spec: SpawnSpec) -> None:
    """The worker's logging, as `celerycompat.boot.start` set it up in the
    parent (a forked child inherits it), stdout and stderr into the log."""
    from celerycompat import logsetup

    options = SimpleNamespace(app=app, loglevel=spec.loglevel, logfile=spec.logfile,
                              nodename=spec.hostname, no_color=spec.no_color,
                              observability=SimpleNamespace(log_format=spec.log_format))
    custom = logsetup.setup_logging(options)
    logsetup.redirect_stdouts(options, custom)


if __name__ == "__main__":
    main(sys.argv[1:])
