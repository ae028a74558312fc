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
globals already exported), and sends it a `SpawnSpec` as the first frame.
The child (`main`) then does what Celery's spawned pool process does
(``process_initializer`` with ``FORKED_BY_MULTIPROCESSING`` set, so
``@app.task`` binds as it does in a fresh interpreter): it loads the app as
``-A`` named it, applies the settings changed on the parent's app (as
Celery's pickled app carries them), sets logging up as the worker did, and
goes on as a forked child would (`celerycompat.pools.child.child_main`:
signals, the app's worker init, ``worker_process_init``, the job loop).
What the parent did after loading the app is not in the child, as under
Celery, except the settings it changed (``celeryd_init`` receivers editing
``app.conf``, say).
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional

from celerycompat.pools import procproto
from celerycompat.pools.child import ChildConfig

logger = logging.getLogger("celery.concurrency.prefork")

#: What billiard's spawn context names its pool processes (``SpawnProcess``
#: with "Process" replaced by "PoolWorker").
NAME_PREFIX = "SpawnPoolWorker"


@dataclass(frozen=True)
class SpawnSpec:
    """Everything a spawned child needs to become the pool process the
    parent would have forked: plain data, sent as the first frame."""

    child: ChildConfig
    app_spec: Optional[str]
    """``-A`` as given (None: Celery's current app)."""
    conf_changes: dict = field(default_factory=dict)
    """The settings changed on the parent's app (`conf_changes`)."""
    hostname: str = ""
    loglevel: Optional[int] = None
    logfile: Optional[str] = None
    no_color: bool = False
    log_format: str = "text"


def conf_changes(app: Any) -> dict:
    """What Celery's pickled app carries into a spawned child: every setting
    changed on the app (the command line's ``key=value`` ones, the
    project's own ``conf.update``, what ``celeryd_init``, ``worker_init``
    and ``celeryd_after_setup`` receivers set), read when the child starts.
    A value that does not pickle is left out, with a warning: the child
    then has the project's own value for it."""
    changes = dict(app._conf.changes if app.configured else app._preconf)
    try:
        pickle.dumps(changes)
        return changes
    except Exception:  # noqa: BLE001 - any value that does not pickle
        pass
    kept = {}
    for key, value in changes.items():
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001
            logger.warning("Spawned pool process: the setting %s does not pickle, so the "
                           "child has the project's own value for it", key)
            continue
        kept[key] = value
    return kept


def announce() -> None:
    """In the parent, before the first child: as Celery's prefork pool does
    for spawn, ``FORKED_BY_MULTIPROCESSING`` in the environment every child
    (and whatever it starts) inherits."""
    os.environ["FORKED_BY_MULTIPROCESSING"] = "1"


def start(spec: SpawnSpec, child_sock: socket.socket, parent_sock: socket.socket) -> int:
    """Start the child for ``spec`` with ``child_sock`` as its end of the pair
    and send it ``spec`` as the pair's first frame; its pid. (Not on its
    command line: settings can outgrow the kernel's 128 KiB per argument.)"""
    fd = child_sock.fileno()
    argv = [sys.executable, "-m", "celerycompat.pools.spawned", str(fd)]
    os.set_inheritable(fd, True)
    try:
        # posix_spawn, not subprocess: the pool's supervisor reaps its
        # children with waitpid, which a Popen object must not race.
        pid = os.posix_spawn(sys.executable, argv, os.environ)
    finally:
        os.set_inheritable(fd, False)
    try:
        parent_sock.sendall(procproto.dumps(("spawn", spec)))
    except OSError:
        pass  # it died at once: reaped and replaced as any child that exits
    return pid


def main(argv: list[str]) -> None:
    """The spawned child: set up as Celery's spawned pool process, then
    `child_main`, which never returns."""
    fd = int(argv[0])
    os.set_inheritable(fd, False)  # not into processes its tasks start
    sock = socket.socket(fileno=fd)
    first = procproto.recv_message(sock, procproto.FrameReader())
    if first is None or first[0] != "spawn":
        raise SystemExit(f"spawned pool process: no start frame from the parent ({first!r})")
    spec: SpawnSpec = first[1]
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
    if spec.conf_changes:
        app.conf.update(spec.conf_changes)
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
