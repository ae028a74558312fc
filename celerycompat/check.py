"""``ccworker check -A proj [worker options]``: what to know before migrating a worker.

Loads the project exactly as the worker would with the same command line
(:mod:`celerycompat.cli`: ``-A`` resolution, configuration, ``import_modules``
with Django's setup and autodiscovery, ``celeryd_init``, ``worker_init``),
connects to nothing, starts nothing, and lists what the project or the
command line uses that ccworker does not do as ``celery worker`` 5.7 does:

* flags and settings ccworker accepts but ignores, or honours differently
  (the lines a ccworker prints at startup, and settings it never reads);
* the pool (custom pools, ``worker_pool = "gevent"``);
* receivers of worker signals Celery would send for this command line and
  ccworker never sends;
* task classes with their own ``Request`` or ``Strategy`` (worker-side
  hooks ccworker does not call);
* behaviour ccworker changes on purpose (docs/compat.md), where the project
  would meet it: time limits enforced on the threads and solo pools, ...

Each finding has a level: ``unsupported`` (ccworker ignores it),
``differs`` (ccworker does it differently), ``note`` (a documented
difference that is not expected to break anything). Exit status, for CI:
0 when there are only notes, 1 when anything is unsupported or differs,
2 when the project cannot be loaded.

Booting runs the project's own ``celeryd_init``/``worker_init`` receivers,
as a worker start does.
"""

from __future__ import annotations

import sys
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, TextIO

from celerycompat import beat
from celerycompat import options as opts

UNSUPPORTED = "unsupported"
DIFFERS = "differs"
NOTE = "note"
LEVELS = (UNSUPPORTED, DIFFERS, NOTE)

EXIT_OK = 0
EXIT_DIFFERS = 1
EXIT_CANNOT_LOAD = 2


@dataclass(frozen=True)
class Finding:
    """One thing ccworker would not do as ``celery worker`` does."""

    level: str
    """:data:`UNSUPPORTED`, :data:`DIFFERS` or :data:`NOTE`."""
    area: str
    """``option``, ``pool``, ``setting``, ``signal``, ``task``, ``queue``,
    ``version`` or ``broker``."""
    subject: str
    """What in the project or command line (a flag, a setting, a class)."""
    detail: str
    """What ccworker does instead, in one or two sentences."""


def exit_status(findings: Iterable[Finding]) -> int:
    """1 if anything is unsupported or differs, else 0."""
    return EXIT_DIFFERS if any(f.level != NOTE for f in findings) else EXIT_OK


# --------------------------------------------------------------------------
# What is looked at


def _name(obj: Any) -> str:
    """``module:qualname`` of a class or function, a string as it is."""
    if isinstance(obj, str):
        return obj
    target = getattr(obj, "__func__", obj)
    module = getattr(target, "__module__", None) or "?"
    qualname = getattr(target, "__qualname__", None) or repr(target)
    # Bootstep classes carry ``module.Name`` as their qualname (StepType).
    return f"{module}:{qualname.removeprefix(module + '.')}"


def _startup_warnings(options: Any) -> Iterator[Finding]:
    """The lines a ccworker prints at startup for flags and settings it
    accepts without honouring (:func:`celerycompat.options.unsupported_warnings`)."""
    for line in options.unsupported:
        text = line.removeprefix("ccworker: ")
        if text.startswith("the app declares its own"):
            # ccworker's own option is shadowed; Celery has no such option.
            yield Finding(NOTE, "option", text.split(" option")[0].rsplit(" ", 1)[-1], text)
        elif text.startswith("pool "):
            yield Finding(UNSUPPORTED, "pool", f"-P {options.requested_pool}", text)
        elif text.startswith(("the gevent pool", "the eventlet pool")):
            yield Finding(DIFFERS, "pool", f"worker_pool = {options.requested_pool!r}", text)
        else:
            yield Finding(UNSUPPORTED, "option", text.split(" is ")[0], text)


def _beat(options: Any) -> Iterator[Finding]:
    refused = beat.refusal(options)
    if refused:
        yield Finding(UNSUPPORTED, "option", "-B",
                      f"refused at start (exit 1), as celery worker refuses it: {refused}")


#: Settings ccworker does not read or reads differently, with their Celery default and
#: what ccworker does; reported only when the project changed them.
IGNORED_SETTINGS: dict[str, tuple[str, Any, str]] = {
    "worker_consumer": (
        UNSUPPORTED, "celery.worker.consumer:Consumer",
        "the custom consumer class is not used: ccworker has its own consumer"),
    "worker_timer": (
        UNSUPPORTED, None, "the custom timer class is not used"),
    "worker_agent": (
        UNSUPPORTED, None, "the worker agent (cell actors) is not started"),
    "worker_cancel_long_running_tasks_on_connection_loss": (
        NOTE, False,
        "honoured on RabbitMQ; on the native Redis path running tasks keep their messages "
        "across a reconnect, so nothing is cancelled"),
    "worker_soft_shutdown_timeout": (
        NOTE, 0.0,
        "honoured; the soft window ends as soon as no task runs (Celery sleeps all of it)"),
    "worker_enable_soft_shutdown_on_idle": (
        NOTE, False,
        "an idle worker has nothing to wait for: reserved and ETA messages are returned "
        "to the queue at every shutdown"),
    "worker_disable_prefetch": (
        NOTE, False,
        "honoured on every broker: no message is reserved for a busy slot (Celery "
        "honours it on Redis only and prefetches as usual on RabbitMQ)"),
    "worker_pool_putlocks": (
        NOTE, True, "a prefork internal of Celery's pool; ccworker's pool has no such lock"),
    "worker_lost_wait": (
        NOTE, 10.0, "a prefork internal of Celery's pool; not used"),
    "worker_timer_precision": (
        NOTE, 1.0, "ccworker's timers have no precision setting"),
}


def _settings(options: Any) -> Iterator[Finding]:
    conf = options.app.conf
    for name, (level, default, detail) in IGNORED_SETTINGS.items():
        value = conf.get(name, default)
        if value != default:
            yield Finding(level, "setting", f"{name} = {value!r}", detail)
    autoscaler = conf.get("worker_autoscaler", "celery.worker.autoscale:Autoscaler")
    if options.autoscale is not None and autoscaler != "celery.worker.autoscale:Autoscaler":
        yield Finding(UNSUPPORTED, "setting", f"worker_autoscaler = {autoscaler!r}",
                      "the custom autoscaler class is not used: ccworker's follows "
                      "Celery's rules (docs/compat.md)")


#: Worker signals Celery sends with some pools: signal name -> those pools.
#: ccworker sends them too, unless it runs another pool than the one asked
#: for (a green pool the process could not be patched for).
UNSENT_SIGNALS: dict[str, tuple[str, ...]] = {
    "eventlet_pool_started": ("eventlet",),
    "eventlet_pool_preshutdown": ("eventlet",),
    "eventlet_pool_postshutdown": ("eventlet",),
    "eventlet_pool_apply": ("eventlet",),
}


def _live_receivers(signal: Any) -> list[Any]:
    """The receivers connected to a Celery signal (weak references resolved)."""
    found = []
    for _, receiver in list(getattr(signal, "receivers", ())):
        if isinstance(receiver, weakref.ReferenceType):  # WeakMethod too
            receiver = receiver()
        if receiver is not None:
            found.append(receiver)
    return found


def _signals(options: Any) -> Iterator[Finding]:
    from celery import signals

    for name, pools in UNSENT_SIGNALS.items():
        if options.requested_pool not in pools or options.pool in pools:
            continue
        receivers = _live_receivers(getattr(signals, name))
        if receivers:
            yield Finding(UNSUPPORTED, "signal", f"{name} receivers: "
                          + ", ".join(_name(r) for r in receivers),
                          f"never sent: this worker runs the {options.pool} pool, not "
                          f"{options.requested_pool}")


def _tasks(options: Any) -> Iterator[Finding]:
    from celery.app.task import Task

    requests: dict[str, list[str]] = {}
    strategies: dict[str, list[str]] = {}
    limited: list[str] = []
    rated: list[str] = []
    for name, task in sorted(options.app.tasks.items()):
        if name.startswith("celery."):
            continue
        if _name(task.Request) != _name(Task.Request):
            requests.setdefault(_name(task.Request), []).append(name)
        if _name(task.Strategy) != _name(Task.Strategy):
            strategies.setdefault(_name(task.Strategy), []).append(name)
        if task.time_limit or task.soft_time_limit:
            limited.append(name)
        if task.rate_limit:
            rated.append(name)
    for cls, names in requests.items():
        yield _request_class(cls, names, options.app.tasks[names[0]])
    for strategy, names in strategies.items():
        yield Finding(UNSUPPORTED, "task", f"Strategy {strategy} ({', '.join(names)})",
                      "not used: ccworker receives every task the same way")
    yield from _time_limits(options, limited)
    if rated:
        yield Finding(NOTE, "task", f"rate limits ({', '.join(rated)})",
                      "a message waiting for a token has its own prefetch slot, so other "
                      "task types are not starved (docs/compat.md, Consuming)")


#: The methods of a task's own Request class ccworker calls where Celery's
#: worker does (consumer/project_requests.py); ``on_success`` Celery itself
#: never calls (``create_request_cls`` replaces it).
REQUEST_HOOKS = frozenset({"__init__", "on_accepted", "on_timeout", "on_failure", "on_retry",
                           "on_success", "acknowledge", "reject"})


def _request_class(name: str, tasks: list[str], task: Any) -> Finding:
    """A task's own Request class: its hooks run; any other override does not."""
    from celery.worker.request import Request as CeleryRequest

    from celerycompat.execution.context import own_request_class

    own = own_request_class(task)
    celery_mro = set(CeleryRequest.__mro__)
    overridden = {attr for klass in (own.__mro__ if own is not None else ())
                  if klass not in celery_mro
                  for attr, value in vars(klass).items()
                  if callable(value) and hasattr(CeleryRequest, attr)}
    subject = f"Request class {name} ({', '.join(tasks)})"
    ignored = sorted(overridden - REQUEST_HOOKS)
    if ignored:
        return Finding(UNSUPPORTED, "task", subject,
                       f"its {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not "
                       "called: ccworker receives and runs "
                       "tasks itself; its hooks (on_accepted, on_failure, on_retry, "
                       "on_timeout, acknowledge, reject) are")
    return Finding(NOTE, "task", subject,
                   "its hooks run where Celery calls them, each after ccworker's own "
                   "handling of that moment (docs/compat.md)")


def _time_limits(options: Any, limited: list[str]) -> Iterator[Finding]:
    """Time limits Celery ignores on its threads/solo/eventlet (and soft ones on gevent)."""
    conf_limits = options.time_limit or options.soft_time_limit
    if not (limited or conf_limits):
        return
    where = ", ".join(limited) if limited else "--time-limit/--soft-time-limit"
    if options.pool in ("threads", "solo"):
        yield Finding(DIFFERS, "task", f"time limits on the {options.pool} pool ({where})",
                      f"enforced by ccworker; Celery's {options.pool} pool lets tasks run "
                      "past them (Celery #1958, #9203)")
    elif options.pool == "gevent" and (options.soft_time_limit
                                       or any(options.app.tasks[n].soft_time_limit
                                              for n in limited)):
        yield Finding(DIFFERS, "task", f"soft time limits on the gevent pool ({where})",
                      "SoftTimeLimitExceeded is raised in the task; Celery's gevent pool "
                      "ignores soft limits")
    elif options.pool == "eventlet":
        yield Finding(DIFFERS, "task", f"time limits on the eventlet pool ({where})",
                      "enforced by ccworker (SoftTimeLimitExceeded raised in the task, "
                      "the task killed at the hard one); Celery's eventlet pool ignores "
                      "both")


def _async_tasks(options: Any) -> Iterator[Finding]:
    """``async def`` tasks: ccworker awaits them; a Celery worker cannot."""
    from celerycompat.execution.coroutines import async_task_names

    names = async_task_names(options.app)
    if not names:
        return
    where = ", ".join(names)
    if options.pool in ("gevent", "eventlet"):
        yield Finding(UNSUPPORTED, "task", f"async def tasks on the {options.pool} pool "
                      f"({where})", "they fail there: run them on -P threads, prefork or "
                      "solo (docs/async-tasks.md)")
    yield Finding(DIFFERS, "task", f"async def tasks ({where})",
                  "ccworker awaits them on the slot's event loop; a Celery worker stores "
                  "FAILURE (it cannot encode the coroutine). Route them to queues only "
                  "ccworkers consume (docs/migration.md, async def tasks)")


def _autoscale(options: Any) -> Iterator[Finding]:
    if options.autoscale is not None and options.pool == "threads":
        yield Finding(NOTE, "option", "--autoscale on the threads pool",
                      "ccworker resizes the threads pool; Celery's crashes when it scales")


def _versions(options: Any) -> Iterator[Finding]:
    """A Celery outside the tested releases, and what falls back on the stack found."""
    from celerycompat.celery_release import celery_version, support_warning
    from celerycompat.consumer.redis_eligibility import missing_channel_attributes

    outside = support_warning(celery_version())
    if outside:
        yield Finding(DIFFERS, "version", outside.split(" is ")[0], outside)
    missing = missing_channel_attributes()
    if missing and options.app.connection_for_read().transport.driver_type == "redis":
        import kombu

        yield Finding(NOTE, "broker", "the Redis fast path",
                      f"off: kombu {kombu.__version__}'s Redis channel lacks "
                      f"{', '.join(missing)}; tasks are fetched through kombu's own Redis "
                      "transport, as celery worker fetches them (slower, same behaviour)")


CHECKS = (_startup_warnings, _beat, _settings, _signals, _tasks, _async_tasks, _autoscale,
          _versions)


def inspect(options: Any) -> list[Finding]:
    """Every finding for a booted app and its :class:`~celerycompat.options.WorkerOptions`."""
    return [finding for check in CHECKS for finding in check(options)]


# --------------------------------------------------------------------------
# Report


def _summary(options: Any) -> list[str]:
    import celery

    from celerycompat import __version__

    app = options.app
    queues = ", ".join(q.name for q in options.consume_queues) or "-"
    pool = options.pool if options.pool == options.requested_pool else \
        f"{options.pool} (asked for: {options.requested_pool})"
    import billiard
    import kombu
    import redis

    lines = [
        f"ccworker check: app {app.main!r} (celery {celery.__version__}, "
        f"celerycompat {__version__})",
        f"  pool: {pool}, concurrency {options.concurrency}; queues: {queues}",
        f"  tasks: {len([n for n in app.tasks if not n.startswith('celery.')])}",
    ]
    if options.beat:
        lines.append(f"  beat: embedded, scheduler {options.scheduler}, "
                     f"schedule {options.schedule_filename}")
    lines.append(f"  found: kombu {kombu.__version__}, redis-py {redis.__version__}, "
                 f"billiard {billiard.__version__}")
    return lines


def render(findings: list[Finding], options: Any) -> str:
    """The report: a summary of what was loaded, one block per finding, a verdict."""
    lines = _summary(options)
    lines.append("")
    width = max(len(level) for level in LEVELS)
    ordered = sorted(findings, key=lambda f: LEVELS.index(f.level))
    for finding in ordered:
        lines.append(f"{finding.level.upper():<{width}}  {finding.area:<8}  {finding.subject}")
        lines.append(f"{'':<{width}}  {'':<8}  {finding.detail}")
    if ordered:
        lines.append("")
    blocking = [f for f in findings if f.level != NOTE]
    notes = len(findings) - len(blocking)
    if blocking:
        lines.append(f"{len(blocking)} finding(s) would behave differently under ccworker"
                     f"{f', {notes} note(s)' if notes else ''} (exit {EXIT_DIFFERS}). "
                     "See docs/compat.md.")
    else:
        lines.append("Nothing found that ccworker does differently from celery worker"
                     f"{f' ({notes} note(s))' if notes else ''} (exit {EXIT_OK}).")
    return "\n".join(lines) + "\n"


def run(boot: Callable[[], opts.WorkerOptions], out: Optional[TextIO] = None) -> int:
    """Boot the project with ``boot`` (the CLI's: the worker's own boot of the
    ``ccworker check`` command line) and report.

    Returns the exit status: 0, 1, or 2 when booting the project failed (the
    traceback is printed to stderr).
    """
    out = out or sys.stdout
    try:
        options = boot()
    except Exception as exc:
        message = getattr(exc, "format_message", None)
        detail = message() if callable(message) else traceback.format_exc()
        print(f"ccworker check: cannot load the project as a worker would:\n{detail}",
              file=sys.stderr)
        return EXIT_CANNOT_LOAD
    findings = inspect(options)
    out.write(render(findings, options))
    out.flush()
    return exit_status(findings)
