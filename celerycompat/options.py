"""The settings a ccworker runs with, resolved the way ``celery worker`` does.

``celery worker`` decides each setting in two places, and a setting can come
out differently depending on which one it is, so we keep both steps:

1. **Command-line stage** (:func:`worker_arguments`): the click callbacks in
   ``celery/bin/worker.py`` and ``celery/bin/base.py::DaemonOption``. They
   run while the command line is parsed, i.e. *before* trailing
   ``key=value`` config and before ``user_preload_options`` handlers, and
   fall back to ``app.conf`` right there: ``-c`` (0/empty ->
   ``worker_concurrency``), ``--prefetch-multiplier`` (0/empty ->
   ``worker_prefetch_multiplier``), ``--disable-prefetch``, ``-S``
   (``worker_state_db``), ``-s`` (``beat_schedule_filename``),
   ``-f/--pidfile/--uid/--gid/--umask/--executable`` (``worker_<name>``),
   ``-P`` (the default ``prefork`` yields to ``worker_pool``), ``-n``
   (defaulted and ``%``-expanded), ``-l`` (to an int). The result is the
   keyword set Celery hands to ``app.Worker(...)``; it is also what
   ``celeryd_init`` handlers receive as ``options``.

   ⚑ A consequence we keep on purpose: ``-- worker_prefetch_multiplier=1``
   updates ``app.conf`` but the worker still prefetches with the value read
   before it (4 by default), exactly like Celery 5.7. Same for
   ``worker_concurrency``.

2. **Worker stage** (:func:`resolve_worker_options`):
   ``WorkController.setup_defaults``/``setup_instance``. Runs after
   ``celeryd_init`` (whose handlers may still change ``app.conf``) and
   applies ``app.either(setting, value)`` -- the flag if it is not ``None``,
   else the setting -- for events, time limits, max tasks/memory per
   child, pool start method, scheduler, ...; then defaults concurrency to the
   CPU count and resolves ``auto``.

Celery writes only three things back into ``app.conf`` on the way, and so do
we (in :mod:`celerycompat.cli` and :mod:`celerycompat.apploader`):
``worker_disable_prefetch``, the trailing ``key=value`` settings and
``include`` (with ``-I`` modules and every loaded task module). ``-b`` and
``--result-backend`` reach ``app.conf`` through the ``CELERY_BROKER_URL`` /
``CELERY_RESULT_BACKEND`` environment variables, as in Celery.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from celerycompat.celery_release import setting
from celerycompat.concurrency_patch import green_patched
from celerycompat.nodenames import expand_nodename, node_format
from celerycompat.observability.settings import ObservabilitySettings

#: Pools ccworker implements today; anything else runs on FALLBACK_POOL.
#: ``processes`` is Celery's other name for ``prefork``. The green pools need
#: the process monkey-patched first (`celerycompat.concurrency_patch`).
SUPPORTED_POOLS = ("prefork", "processes", "solo", "threads", "gevent", "eventlet", "asyncio")
GREEN_POOLS = ("gevent", "eventlet")
FALLBACK_POOL = "threads"

#: ``-P`` values Celery 5.7 knows, in the order ``celery worker --help`` lists.
BUILTIN_POOL_PATHS = {
    "prefork": "celery.concurrency.prefork:TaskPool",
    "eventlet": "celery.concurrency.eventlet:TaskPool",
    "gevent": "celery.concurrency.gevent:TaskPool",
    "solo": "celery.concurrency.solo:TaskPool",
    "processes": "celery.concurrency.prefork:TaskPool",
    "threads": "celery.concurrency.thread:TaskPool",
}

#: ``-P`` values only ccworker has: ``asyncio`` (``async def`` tasks, pools/asyncio_pool.py).
CCWORKER_POOLS = ("asyncio",)

#: Pools whose ``-c auto`` Celery caps to the cgroup CPU quota (CPU-bound).
_CPU_BOUND_POOLS = ("prefork", "processes")


def pool_choices() -> tuple[str, ...]:
    """Accepted ``-P`` values: the built-ins, plus ``custom`` when the
    ``CELERY_CUSTOM_WORKER_POOL`` environment variable names a pool class."""
    names = (*BUILTIN_POOL_PATHS, *CCWORKER_POOLS)
    if os.environ.get("CELERY_CUSTOM_WORKER_POOL"):
        names += ("custom",)
    return names


def pool_alias(pool: Any) -> str:
    """A readable name for a pool given as alias, ``module:Class`` or class.

    Known implementation paths map back to their alias (the path of
    ``celery.concurrency.solo:TaskPool`` is ``solo``), so ``worker_pool`` set
    to a class path of a supported pool still selects our implementation.
    """
    if isinstance(pool, type):
        pool = f"{pool.__module__}:{pool.__qualname__}"
    pool = str(pool)
    if pool in BUILTIN_POOL_PATHS:
        return pool
    if pool == "custom":
        return pool
    for alias, path in BUILTIN_POOL_PATHS.items():
        if path == pool or path.replace(":", ".") == pool:
            return "prefork" if alias == "processes" else alias
    return pool


def requested_pool(app: Any, cli_value: Optional[str]) -> str:
    """The pool ``celery worker`` would run, as a name (see :func:`pool_alias`).

    The ``-P`` default is ``prefork``; Celery cannot tell an explicit
    ``-P prefork`` from the default, so in both cases a configured
    ``worker_pool`` wins. Any other ``-P`` value beats the setting.
    """
    value = cli_value or "prefork"
    configured = app.conf.worker_pool
    if value == "prefork" and configured:
        return pool_alias(configured)
    return pool_alias(value)


def split_list(value: Any) -> list[str]:
    """``-Q a,b`` -> ``["a", "b"]``; lists pass through; ``None`` -> ``[]``.

    Items are not stripped (Celery does not strip them either).
    """
    if value is None:
        return []
    if isinstance(value, str):
        return value.split(",")
    return list(value)


def _auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _daemon_setting(app: Any, name: str, value: Any) -> Any:
    """``DaemonOption``: the flag, else the ``worker_<name>`` setting if any."""
    return value or getattr(app.conf, f"worker_{name}", None)


def _cli_concurrency(app: Any, value: Any) -> Any:
    """``-c``: ``auto`` stays a sentinel, ``0``/empty defer to the setting."""
    if not value:
        return app.conf.worker_concurrency
    if _auto(value):
        return "auto"
    try:
        parsed = int(value)
    except (TypeError, ValueError):
        parsed = -1
    if parsed < 0:
        raise ValueError(f"must be a non-negative integer or 'auto', got {value!r}")
    return parsed or app.conf.worker_concurrency


def worker_arguments(app: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """Stage 1: the keywords ``celery worker`` passes to ``app.Worker``.

    ``params`` are the parsed flag values keyed by click parameter name (as
    :mod:`celerycompat.cli` produces them; ``loglevel`` already an int).
    Returns a new dict: ``hostname`` (expanded nodename), ``pool`` (the
    requested pool *name*), ``concurrency``, ``prefetch_multiplier``,
    ``disable_prefetch``, ``statedb``/``pidfile`` (node-formatted),
    ``logfile`` (template; expanded later by ``app.log.setup``),
    ``schedule_filename``, ``uid``/``gid``/``umask``/``executable`` and every
    other flag unchanged, including user ``worker`` and ``preload`` options.

    Raises:
        ValueError: ``-c`` is neither a non-negative integer nor ``auto``.
    """
    args = dict(params)
    nodename = expand_nodename(args.get("hostname"))
    args["hostname"] = nodename
    args["pool"] = requested_pool(app, args.get("pool"))
    args["concurrency"] = _cli_concurrency(app, args.get("concurrency"))
    args["prefetch_multiplier"] = (args.get("prefetch_multiplier")
                                   or app.conf.worker_prefetch_multiplier)
    flag = args.get("disable_prefetch")
    args["disable_prefetch"] = (setting(app.conf, "worker_disable_prefetch") if flag is None
                                else flag)
    args["statedb"] = args.get("statedb") or app.conf.worker_state_db
    args["schedule_filename"] = (args.get("schedule_filename")
                                 or app.conf.beat_schedule_filename)
    for name in ("logfile", "pidfile", "uid", "gid", "umask", "executable"):
        args[name] = _daemon_setting(app, name, args.get(name))
    args["pidfile"] = node_format(args["pidfile"], nodename)
    args["statedb"] = node_format(args["statedb"], nodename)
    return args


@dataclass
class WorkerOptions:
    """Everything a ccworker runs with, typed and fully resolved.

    Built by :func:`resolve_worker_options`; the worker reads only this (and
    ``app.conf`` for settings without a flag). Field meanings follow the
    ``celery worker`` flag of the same name (wire contract H2).
    """

    app: Any
    """The ``celery.Celery`` instance from ``-A``."""
    nodename: str
    """``name@host`` after defaulting and ``%h/%n/%d`` expansion."""
    pool: str
    """The pool ccworker runs: ``prefork``, ``solo``, ``threads``, ``gevent`` or ``eventlet``."""
    requested_pool: str
    """The pool Celery would have run (alias or ``module:Class``)."""
    concurrency: int
    loglevel: int
    logfile: Optional[str]
    """As given (``%n`` etc. unexpanded), like Celery's ``Worker.logfile``;
    :attr:`logfile_path` is the expanded path."""
    queues: list[str] = field(default_factory=list)
    exclude_queues: list[str] = field(default_factory=list)
    include: list[str] = field(default_factory=list)
    prefetch_multiplier: int = 4
    disable_prefetch: bool = False
    task_events: bool = False
    time_limit: Optional[float] = None
    """Seconds, as given (an int setting stays an int, as in Celery)."""
    soft_time_limit: Optional[float] = None
    max_tasks_per_child: Optional[int] = None
    max_memory_per_child: Optional[int] = None
    optimization: str = "default"
    purge: bool = False
    without_gossip: bool = False
    without_mingle: bool = False
    without_heartbeat: bool = False
    heartbeat_interval: float = 2.0
    autoscale: Optional[tuple[int, int]] = None
    """``(max, min)`` as Celery orders it, or ``None``."""
    beat: bool = False
    schedule_filename: Optional[str] = None
    scheduler: Optional[str] = None
    statedb: Optional[str] = None
    """Node-formatted path, or ``None``."""
    pidfile: Optional[str] = None
    """Node-formatted path, or ``None``."""
    detach: bool = False
    uid: Optional[str] = None
    gid: Optional[str] = None
    umask: Optional[str] = None
    executable: Optional[str] = None
    pool_start_method: str = "fork"
    app_spec: Optional[str] = None
    """``-A`` as given: a spawned prefork child loads the app from it."""
    quiet: bool = False
    no_color: bool = False
    user_options: dict[str, Any] = field(default_factory=dict)
    """Values of the app's own ``preload``/``worker`` click options."""
    unsupported: list[str] = field(default_factory=list)
    """One warning line per accepted-but-ignored flag or setting."""
    consume_queues: list[Any] = field(default_factory=list, repr=False)
    """The kombu queues to consume, selected (``-Q``/``-X``) before ``worker_init``
    as Celery selects them; empty until the app is booted."""
    celery_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    """The stage-1 keywords (what Celery passes to ``app.Worker``)."""
    observability: ObservabilitySettings = field(default_factory=ObservabilitySettings)
    """ccworker's own flags (``--metrics-port``, ``--log-format``...), set by the
    command line apart from the stage-1 keywords: Celery has no such flags."""

    @property
    def logfile_path(self) -> Optional[str]:
        """:attr:`logfile` expanded for this node (``None``: log to stderr)."""
        return node_format(self.logfile, self.nodename)


def _cpu_count() -> int:
    """CPU count as Celery's worker default (billiard), 2 if unknown."""
    try:
        from billiard import cpu_count
    except ImportError:  # pragma: no cover - billiard ships with Celery
        return os.cpu_count() or 2
    try:
        return cpu_count()
    except NotImplementedError:  # pragma: no cover
        return 2


def _auto_concurrency(requested: str) -> int:
    """``-c auto``: the CPUs this process may use, capped to the cgroup quota
    when the *requested* pool is CPU-bound (prefork), as Celery 5.7 sizes it.
    We follow the requested pool so a prefork deployment keeps its size."""
    try:
        from celery.utils.sysinfo import cpu_budget
    except ImportError:  # Celery < 5.7 has no "auto"
        return _cpu_count()
    return cpu_budget(use_cgroup_quota=requested in _CPU_BOUND_POOLS).count


def resolve_concurrency(value: Any, requested: str) -> int:
    """Stage 2 of ``-c``: strings to int, falsy/invalid -> CPU count, auto."""
    if _auto(value):
        return _auto_concurrency(requested)
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            value = None
    return int(value) if value else _cpu_count()


def _optional(kind: type, value: Any) -> Any:
    return None if value is None else kind(value)


def resolve_worker_options(app: Any, args: Mapping[str, Any],
                           explicit: frozenset[str] = frozenset(),
                           user_option_names: frozenset[str] = frozenset(),
                           ) -> WorkerOptions:
    """Stage 2: ``WorkController.setup_defaults`` over the stage-1 keywords.

    ``explicit`` names the flags given on the command line or through their
    environment variable (for warnings about ignored flags);
    ``user_option_names`` the app's own preload/worker options to collect.
    Call it after ``celeryd_init`` so handlers' ``app.conf`` changes count.

    Raises:
        ValueError: ``worker_pool_start_method`` is neither fork nor spawn.
    """
    either = app.either
    requested = str(args.get("pool") or "prefork")
    pool = requested if requested in SUPPORTED_POOLS else FALLBACK_POOL
    if pool in GREEN_POOLS and not green_patched(pool):
        pool = FALLBACK_POOL  # e.g. worker_pool = "gevent": seen too late to patch
    if pool == "processes":
        pool = "prefork"
    start_method = args.get("pool_start_method")
    if start_method is None:
        start_method = setting(app.conf, "worker_pool_start_method")
    if start_method not in ("fork", "spawn"):
        raise ValueError("worker_pool_start_method must be 'fork' or 'spawn', "
                         f"got {start_method!r}.")
    heartbeat = args.get("heartbeat_interval")
    autoscale = args.get("autoscale")
    options = WorkerOptions(
        app=app,
        nodename=args["hostname"],
        pool=pool,
        requested_pool=requested,
        concurrency=resolve_concurrency(either("worker_concurrency", args.get("concurrency")),
                                        requested),
        loglevel=int(args.get("loglevel") or 30),
        logfile=args.get("logfile"),
        queues=split_list(args.get("queues")),
        exclude_queues=split_list(args.get("exclude_queues")),
        include=split_list(args.get("include")),
        prefetch_multiplier=int(either("worker_prefetch_multiplier",
                                       args.get("prefetch_multiplier"))),
        disable_prefetch=bool(setting(app.conf, "worker_disable_prefetch")),
        task_events=bool(either("worker_send_task_events", args.get("task_events"))),
        # As given (Celery does not convert): a limit of 2 is logged and
        # stored as ``TimeLimitExceeded(2)``, ``--time-limit 2`` as 2.0.
        time_limit=either("task_time_limit", args.get("time_limit")),
        soft_time_limit=either("task_soft_time_limit", args.get("soft_time_limit")),
        max_tasks_per_child=_optional(int, either("worker_max_tasks_per_child",
                                                  args.get("max_tasks_per_child"))),
        max_memory_per_child=_optional(int, either("worker_max_memory_per_child",
                                                   args.get("max_memory_per_child"))),
        optimization=args.get("optimization") or "default",
        purge=bool(args.get("purge")),
        without_gossip=bool(args.get("without_gossip")),
        without_mingle=bool(args.get("without_mingle")),
        without_heartbeat=bool(args.get("without_heartbeat")),
        # celery.worker.heartbeat.Heart: ``float(interval or 2.0)``.
        heartbeat_interval=float(heartbeat or 2.0),
        autoscale=tuple(autoscale) if autoscale else None,
        beat=bool(args.get("beat")),
        schedule_filename=either("beat_schedule_filename", args.get("schedule_filename")),
        scheduler=either("beat_scheduler", args.get("scheduler")),
        statedb=either("worker_state_db", args.get("statedb")),
        pidfile=args.get("pidfile"),
        detach=bool(args.get("detach")),
        uid=args.get("uid"),
        gid=args.get("gid"),
        umask=args.get("umask"),
        executable=args.get("executable"),
        pool_start_method=start_method,
        quiet=bool(args.get("quiet")),
        no_color=bool(args.get("no_color")),
        user_options={k: args[k] for k in sorted(user_option_names) if k in args},
        celery_kwargs=dict(args),
    )
    options.unsupported = unsupported_warnings(options, explicit)
    return options


def unsupported_warnings(options: WorkerOptions, explicit: frozenset[str]) -> list[str]:
    """One line per flag/setting in effect that ccworker does not honour yet.

    Settings-driven values (``worker_max_tasks_per_child`` in Django
    settings, say) are reported too: the operator asked for them somewhere.
    ``--without-*``, ``--heartbeat-interval`` and ``-O fair`` are silent:
    they only turn off or tune things ccworker does not do.
    """
    lines = []
    if options.requested_pool not in SUPPORTED_POOLS:
        lines.append(f"ccworker: pool {options.requested_pool!r} is not supported yet; "
                     f"using {options.pool!r} instead")
    elif options.requested_pool in GREEN_POOLS and options.pool != options.requested_pool:
        green = options.requested_pool
        lines.append(f"ccworker: the {green} pool needs -P {green} on the command line "
                     f"(or CELERY_WORKER_POOL={green}), so the process is monkey-patched "
                     f"before the app is imported; using {options.pool!r} instead")
    if options.autoscale is not None and options.pool == "solo":
        # Celery's solo pool cannot grow either (its autoscaler fails when it tries).
        lines.append("ccworker: --autoscale is ignored by the solo pool, which runs one "
                     "task at a time")
    return lines
