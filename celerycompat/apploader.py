"""Find the user's Celery app from ``-A`` and prepare it as ``celery worker`` does.

Resolution of ``-A`` (``celery/app/utils.py::find_app``, ``celery/bin/celery.py``):

* ``module:attr`` -> that attribute, no questions asked;
* ``module.attr`` -> the attribute ``attr`` of ``module``; when ``module`` has no
  such attribute the whole string is imported as a module instead;
* a module (also the result of the previous rule) -> its ``app`` attribute,
  else its ``celery`` attribute (unless that is a module), else, for a
  package, the same search in ``<package>.celery``, else the first
  ``Celery`` instance among the module's globals;
* no ``-A`` at all -> Celery's current (default) app.

Imports happen with the current directory at the front of ``sys.path`` and
taken off again afterwards, as ``celery`` does; ``--workdir`` changes that
directory first.

Booting the app for a worker happens in two calls, around option
resolution, because Celery interleaves them (``WorkController.__init__``):

1. :func:`prepare_app_for_worker` -- ``app.loader.init_worker()`` (sends
   ``import_modules``, where the Django fixup runs ``django.setup()`` and
   checks and ``autodiscover_tasks`` imports each app's ``tasks``; imports
   ``imports``/``include``; ``loader.on_worker_init``), then the worker
   optimizations (app made current and default, **finalized**, task
   ``__call__`` stack protection), ``celeryd_init`` and the root/pickle check.
2. :mod:`celerycompat.options` resolves ``setup_defaults`` (so
   ``celeryd_init`` handlers that edit ``app.conf`` are honoured).
3. :func:`init_worker_side` -- ``-I`` modules imported and ``include``
   rewritten, then ``worker_init`` (the Django fixup installs its
   per-task database/cache hooks here).

After that Celery sets up logging (:mod:`celerycompat.logsetup`). What
remains for the worker itself, in Celery's order: select queues
(``-Q/-X``, ``worker_direct``), create the pidfile, send
``celeryd_after_setup(sender=nodename, instance=worker, conf=app.conf)``,
purge, banner, start consuming, ``worker_ready`` once ready;
``worker_shutdown`` and ``app.loader.shutdown_worker()`` on the way out.
"""

from __future__ import annotations

import contextlib
import os
import sys
from importlib import import_module
from types import ModuleType
from typing import Any, Iterator, Mapping, Optional

from celery import Celery, signals


class AppNotFound(Exception):
    """``-A`` named something that is not (and does not contain) a Celery app."""


@contextlib.contextmanager
def cwd_on_sys_path() -> Iterator[None]:
    """Put the current directory first on ``sys.path`` while importing.

    ``celery`` is a console script, so the project directory is not on the
    path by itself; Celery adds it around each import and removes it again
    (unless it was already there), and so do we, so the same modules win.
    """
    try:
        cwd = os.getcwd()
    except FileNotFoundError:
        cwd = ""
    if not cwd or cwd in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def import_from_cwd(name: str) -> ModuleType:
    """Import ``name`` with the current directory on ``sys.path``."""
    with cwd_on_sys_path():
        return import_module(name)


def _symbol(spec: str) -> Any:
    """``a.b:c`` / ``a.b.c`` -> attribute ``c`` of module ``a.b``; ``a`` -> module.

    Raises ``AttributeError`` when the module lacks the attribute, so the
    caller can retry the whole dotted name as a module.
    """
    sep = ":" if ":" in spec else "."
    module_name, _, attr = spec.rpartition(sep)
    if not module_name:
        return import_from_cwd(attr)
    module = import_from_cwd(module_name)
    return getattr(module, attr) if attr else module


def _attr_not_module(module: ModuleType, name: str) -> Any:
    """``module.<name>`` unless missing or itself a module (AttributeError)."""
    found = getattr(module, name)
    if isinstance(found, ModuleType):
        raise AttributeError(f"attribute {name!r} is the {found.__name__} module, "
                             "not a Celery instance")
    return found


def find_app(spec: str) -> Any:
    """Resolve an ``-A`` value in the current directory (see module docstring).

    Raises:
        ModuleNotFoundError/ImportError: a module on the way failed to import.
        AttributeError: a module was found but holds no app.
    """
    try:
        found = _symbol(spec)
    except AttributeError:
        found = import_from_cwd(spec)
    if not isinstance(found, ModuleType) or ":" in spec:
        return found
    for name in ("app", "celery"):
        try:
            return _attr_not_module(found, name)
        except AttributeError as exc:
            missing = exc
    swallowed: Optional[ImportError] = None
    if getattr(found, "__path__", None):
        try:
            return find_app(f"{spec}.celery")
        except ImportError as exc:
            # Celery swallows this too and goes on searching, which hides a
            # broken ``proj/celery.py``; we keep the outcome but remember why.
            swallowed = exc
    for value in vars(found).values():
        if isinstance(value, Celery):
            return value
    if swallowed is not None and getattr(swallowed, "name", None) != f"{spec}.celery":
        raise AttributeError(f"{missing} (and importing {spec}.celery failed: "
                             f"{swallowed!r})") from swallowed
    raise missing


def load_app(spec: Optional[str], workdir: Optional[str] = None) -> Celery:
    """The Celery app ``celery -A spec --workdir workdir`` would use.

    ``workdir`` is entered with ``os.chdir`` first (for the rest of the
    process, as in Celery). Without ``spec`` Celery's current app is used.

    Raises:
        ImportError: the module (or something it imports) failed to import.
        AttributeError: no app in the module.
        AppNotFound: ``spec`` resolved to something that is not a Celery app.
    """
    if workdir:
        os.chdir(workdir)
    if not spec:
        from celery import current_app
        return current_app._get_current_object()
    found = find_app(spec)
    if not isinstance(found, Celery):
        raise AppNotFound(f"{spec!r} is {found!r}, not a Celery application")
    return found


#: Stage-1 keys Celery consumes before ``celeryd_init`` (``hostname`` and
#: ``quiet`` are named parameters on the way, ``--uid/--gid`` are used to drop
#: privileges, ``--disable-prefetch`` goes to ``app.conf``).
_NOT_WORKER_KWARGS = frozenset({"hostname", "quiet", "uid", "gid", "disable_prefetch"})


class BootingWorker:
    """What Celery's startup signals get as the worker while ccworker boots.

    ``celeryd_init``/``worker_init`` handlers (the Django fixup among them)
    read ``sender.app``, ``sender.hostname`` and sometimes ``pool_cls`` or
    ``concurrency``; the real worker object is built later by
    :mod:`celerycompat.worker`, which may pass itself instead.
    """

    def __init__(self, app: Celery, hostname: str, options: Mapping[str, Any]):
        self.app = app
        self.hostname = hostname
        self.options = dict(options)
        self.pool_cls: Any = f"celerycompat.pools.{options.get('pool') or 'threads'}"
        self.concurrency = options.get("concurrency")
        self.loglevel = options.get("loglevel")
        self.logfile = options.get("logfile")

    def __str__(self) -> str:
        return self.hostname

    def __repr__(self) -> str:
        return f"<ccworker: {self.hostname} (booting)>"


def prepare_app_for_worker(app: Celery, nodename: str, worker_kwargs: Mapping[str, Any],
                           instance: Any = None) -> Any:
    """Boot step 1 (Celery's ``WorkController.__init__`` up to ``setup_defaults``).

    ``worker_kwargs`` is the stage-1 keyword set
    (:func:`celerycompat.options.worker_arguments`); ``celeryd_init``
    receives it as ``options`` (without ``hostname``/``quiet``, as in Celery).
    Returns the object passed as ``instance`` (a :class:`BootingWorker` if
    none was given) so :func:`init_worker_side` can reuse it.

    Raises:
        celery.exceptions.SecurityError: running as root with pickle accepted.
    """
    from celery.app.trace import setup_worker_optimizations
    from celery.platforms import check_privileges

    from celerycompat.execution import coroutines

    if instance is None:
        instance = BootingWorker(app, nodename, worker_kwargs)
    app.loader.init_worker()
    setup_worker_optimizations(app, nodename)
    # ``async def`` tasks become plain calls that await on the slot's loop.
    coroutines.adapt_all(app)
    options = {k: v for k, v in worker_kwargs.items() if k not in _NOT_WORKER_KWARGS}
    options.setdefault("pool_cls", _celery_pool_class(options.get("pool")))
    signals.celeryd_init.send(sender=nodename, instance=instance, conf=app.conf,
                              options=options)
    check_privileges(app.conf.accept_content)
    return instance


def _celery_pool_class(pool: Any) -> Any:
    """The pool class ``celery worker`` passes as ``pool_cls`` (its ``-P`` type resolves it).

    ``celeryd_init`` receivers see the class of the pool that was *asked
    for*, as under Celery, even while ccworker runs another one.
    """
    from celery import concurrency

    try:
        return concurrency.get_implementation(pool or "prefork")
    except Exception:  # a custom pool that does not import here: keep its name
        return pool


def import_includes(app: Celery, include: list[str]) -> None:
    """``-I``: import the modules and record every task module in ``include``.

    Celery rewrites ``include`` to all modules that define a loaded task so
    a re-executed worker (and ``inspect conf``) sees the full list.
    """
    previous = tuple(app.conf.include)
    for module in include:
        app.loader.import_task_module(module)
    modules = {type(task).__module__ for task in app.tasks.values()}
    app.conf.include = tuple(set(previous) | set(include) | modules)


def init_worker_side(options: Any, instance: Any = None) -> Any:
    """Boot step 3: ``-I`` imports, then ``worker_init(sender=instance)``.

    ``options`` is a :class:`celerycompat.options.WorkerOptions`. Safe to
    call twice: the second call for the same app does nothing, so the
    worker may call it with its real worker object if the CLI did not.
    Returns the instance used as sender.
    """
    app = options.app
    if getattr(app, "_ccworker_worker_side_ready", False):
        return instance
    if instance is None:
        instance = BootingWorker(app, options.nodename, options.celery_kwargs)
    instance.pool_cls = f"celerycompat.pools.{options.pool}"
    instance.concurrency = options.concurrency
    import_includes(app, options.include)
    app._ccworker_worker_side_ready = True
    signals.worker_init.send(sender=instance)
    return instance
