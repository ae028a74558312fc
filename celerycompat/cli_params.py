"""The options of ``ccworker``: ``celery``'s global options and ``celery
worker``'s, with the same names, types, choices, defaults and environment
variables (``celery/bin/celery.py``, ``celery/bin/worker.py``,
``celery/bin/base.py``), the parameter types that give the same values as
Celery's, and ccworker's own few options. `build_command` makes the click
command celerycompat/cli.py parses a command line with.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import click

from celerycompat import options as opts
from celerycompat.celery_release import worker_option_names
from celerycompat.nodenames import expand_nodename

PROG = "ccworker"
WORKER_ENV_PREFIX = "CELERY_WORKER"
LOG_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40,
              "CRITICAL": 50, "FATAL": 50}


# --------------------------------------------------------------------------
# Parameter types (the same accepted values and results as Celery's)


class LogLevel(click.Choice):
    """``-l``: a level name in any case, converted to its ``logging`` number."""

    def __init__(self) -> None:
        super().__init__(tuple(LOG_LEVELS))

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int):
            return value
        name = super().convert(str(value).upper(), param, ctx)
        return LOG_LEVELS[name]


class CommaList(click.ParamType):
    """``-Q a,b``: split on commas, items kept as written."""

    name = "comma separated list"

    def convert(self, value: Any, param: Any, ctx: Any) -> list[str]:
        return opts.split_list(value)


class Autoscale(click.ParamType):
    """``--autoscale max,min`` (either order) or ``max``: ``(max, min)``."""

    name = "<min workers>, <max workers>"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        parts = str(value).split(",")
        if len(parts) > 2:
            self.fail("Expected two comma separated integers or one integer."
                      f"Got {len(parts)} instead.", param, ctx)
        try:
            numbers = [int(p) for p in parts] + ([0] if len(parts) == 1 else [])
        except ValueError:
            self.fail(f"Expected comma separated integers. Got {value} instead.", param, ctx)
        high, low = sorted(numbers, reverse=True)
        return high, low


class Nodename(click.ParamType):
    """``-n``: kept as written (expanded later), but a bad ``%x`` fails here."""

    name = "hostname"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        try:
            expand_nodename(value)
        except ValueError as exc:
            self.fail(str(exc).strip(), param, ctx)
        return value


def _check_beat(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """``-B``: refused on Windows while parsing, with Celery's message
    (``celery/bin/worker.py``, ``CeleryBeat``); the green-pool refusal comes
    later, from :mod:`celerycompat.beat`, where Celery's comes."""
    from celery.platforms import IS_WINDOWS

    if value and IS_WINDOWS:
        raise click.BadParameter("-B option does not work on Windows.  "
                                 "Please run celery beat as a separate service.",
                                 ctx=ctx, param=param)
    return value


def _check_concurrency(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """``-c``: a non-negative integer or ``auto``; the app-dependent fallback
    to ``worker_concurrency`` happens in :mod:`celerycompat.options`."""
    if not value:
        return value
    if isinstance(value, str) and value.strip().lower() == "auto":
        return value
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0:
        raise click.BadParameter(f"must be a non-negative integer or 'auto', got {value!r}",
                                 ctx=ctx, param=param)
    return value


# --------------------------------------------------------------------------
# The options


def _global(*decls: str, envvar: Optional[str] = None, **kw: Any) -> click.Option:
    """A ``celery`` global option: its own env var, then ``CELERY_<NAME>``."""
    option = click.Option(decls, **kw)
    names = [envvar] if envvar else []
    names.append(f"CELERY_{option.name.upper()}")
    option.envvar = names
    option.allow_from_autoenv = False  # not CELERY_WORKER_<NAME>
    return option


GLOBAL_NAMES = ("app", "broker", "result_backend", "loader", "config", "workdir",
                "no_color", "quiet", "version", "skip_checks")


def global_params() -> list[click.Parameter]:
    """``celery --help`` "Global Options" (``celery/bin/celery.py``)."""
    return [
        _global("-A", "--app", envvar="APP", type=click.UNPROCESSED,
                help="module, module:attr or module.attr of the Celery app."),
        _global("-b", "--broker", envvar="BROKER_URL", help="Overrides broker_url."),
        _global("--result-backend", envvar="RESULT_BACKEND", help="Overrides result_backend."),
        _global("--loader", envvar="LOADER", help="Loader class."),
        _global("--config", envvar="CONFIG_MODULE", help="Configuration module name."),
        _global("--workdir", type=click.Path(), help="Change to this directory first."),
        _global("-C", "--no-color", envvar="NO_COLOR", is_flag=True, help="No colors."),
        _global("-q", "--quiet", is_flag=True, help="Less output."),
        _global("--version", is_flag=True, help="Print ccworker and Celery versions."),
        _global("--skip-checks", envvar="SKIP_CHECKS", is_flag=True,
                help="Skip Django core checks on startup."),
    ]


def worker_params() -> list[click.Parameter]:
    """``celery worker --help`` (``celery/bin/worker.py`` and the daemon
    options of ``celery/bin/base.py``), same names, types and defaults: those
    of 5.7 that the installed release's ``celery worker`` also has (Celery 5.2
    has no ``--disable-prefetch`` or ``--pool-start-method``: they are usage
    errors there, and absent from what ``celeryd_init`` receives)."""
    known = worker_option_names()
    return [param for param in _worker_params_5_7() if param.name in known]


def _worker_params_5_7() -> list[click.Parameter]:
    o = click.Option
    return [
        o(["-n", "--hostname"], type=Nodename(),
          help="Set custom hostname (e.g., 'w1@%h'). Expands: %h (hostname), "
               "%n (name) and %d, (domain)."),
        o(["-D", "--detach"], is_flag=True, default=False,
          help="Start worker as a background process (not supported yet)."),
        o(["-S", "--statedb"], type=click.Path(), help="Path to the state database."),
        o(["-l", "--loglevel"], default="WARNING", type=LogLevel(), help="Logging level."),
        o(["-O", "--optimization"], default="default", type=click.Choice(("default", "fair")),
          help="Apply optimization profile."),
        o(["--prefetch-multiplier"], type=int, metavar="<prefetch multiplier>",
          help="Set custom prefetch multiplier value for this worker instance."),
        o(["--disable-prefetch"], is_flag=True, default=None,
          help="Disable broker prefetching (Redis only)."),
        o(["-c", "--concurrency"], type=str, metavar="<concurrency>",
          callback=_check_concurrency,
          help="Number of pool slots; default: number of CPUs; or 'auto'."),
        o(["-P", "--pool"], default="prefork", type=click.Choice(opts.pool_choices()),
          help="Pool implementation (gevent and eventlet need it on the command line)."),
        o(["-E", "--task-events", "--events"], is_flag=True, default=None,
          help="Send task-related events."),
        o(["--time-limit"], type=float, help="Hard time limit (seconds) for tasks."),
        o(["--soft-time-limit"], type=float, help="Soft time limit (seconds) for tasks."),
        o(["--max-tasks-per-child"], type=int,
          help="Maximum number of tasks a pool worker can execute before it's replaced."),
        o(["--pool-start-method"], type=click.Choice(["fork", "spawn"]),
          help="Start method for prefork pool child processes."),
        o(["--max-memory-per-child"], type=int,
          help="Maximum resident memory (KiB) of a child before it is replaced."),
        o(["--purge", "--discard"], is_flag=True, help="Purge consumed queues first."),
        o(["--queues", "-Q"], type=CommaList()),
        o(["--exclude-queues", "-X"], type=CommaList()),
        o(["--include", "-I"], type=CommaList()),
        o(["--without-gossip"], is_flag=True),
        o(["--without-mingle"], is_flag=True),
        o(["--without-heartbeat"], is_flag=True),
        o(["--heartbeat-interval"], type=int),
        o(["--autoscale"], type=Autoscale()),
        o(["-B", "--beat"], is_flag=True, default=None, callback=_check_beat,
          help="Also run the celery beat periodic task scheduler (as a child process)."),
        o(["-s", "--schedule-filename", "--schedule"],
          help="Path to the schedule database of the embedded beat "
               "(default: beat_schedule_filename)."),
        o(["--scheduler"], help="Scheduler class of the embedded beat "
                                "(default: beat_scheduler)."),
        o(["--logfile", "-f"], help="Log destination; defaults to stderr"),
        o(["--pidfile"], help="PID file path; defaults to no PID file"),
        o(["--uid"], help="Drops privileges to this user ID"),
        o(["--gid"], help="Drops privileges to this group ID"),
        o(["--umask"], help="Create files and directories with this umask"),
        o(["--executable"], help="Override path to the Python executable"),
    ]


def _own(*decls: str, envvar: str, **kw: Any) -> click.Option:
    """A ccworker-only option: its ``CCWORKER_*`` variable, not ``CELERY_WORKER_<NAME>``."""
    option = click.Option(decls, envvar=envvar, show_envvar=True, **kw)
    option.allow_from_autoenv = False
    return option


def ccworker_params() -> list[click.Parameter]:
    """ccworker's own options (no ``celery worker`` counterpart; docs/operations.md)."""
    return [
        _own("--metrics-port", envvar="CCWORKER_METRICS_PORT", type=click.IntRange(0, 65535),
             help="ccworker only: serve Prometheus metrics (/metrics) and health probes "
                  "(/healthz, /readyz) on this port; 0 picks a free port. Off by default."),
        _own("--metrics-host", envvar="CCWORKER_METRICS_HOST", default="127.0.0.1",
             show_default=True,
             help="ccworker only: address the metrics endpoint binds to; 0.0.0.0 to serve "
                  "other hosts (in a container, for probes through the pod IP)."),
        _own("--health-stall-timeout", envvar="CCWORKER_HEALTH_STALL_TIMEOUT", default=60.0,
             show_default=True, type=click.FloatRange(min=0, min_open=True),
             help="ccworker only: /healthz fails when the consumer loop has not turned for "
                  "this many seconds (not counting reconnection or a task running inline "
                  "under -P solo)."),
        _own("--log-format", envvar="CCWORKER_LOG_FORMAT", default="text", show_default=True,
             type=click.Choice(("text", "json")),
             help="ccworker only: text (Celery's log format) or json (one JSON object "
                  "per line)."),
    ]


OWN_NAMES = ("metrics_port", "metrics_host", "health_stall_timeout", "log_format")


def shadowed(own: click.Parameter, extra: Sequence[click.Parameter]) -> bool:
    """The app declares an option of the same name or flag: the app's wins."""
    return any(p.name == own.name or set(p.opts) & set(own.opts) for p in extra)


def build_command(extra: Sequence[click.Parameter] = (), lenient: bool = False) -> click.Command:
    """The ``ccworker`` click command; ``extra`` are the app's own options.

    ccworker's own options are left out where the app declares one with the
    same name or flag, so a project's own ``--metrics-port`` keeps working.

    ``lenient`` is pass 1: unknown options are let through (they may be the
    app's) and ``--help`` waits for pass 2, which knows all options.
    """
    settings: dict[str, Any] = {"allow_extra_args": True}
    if lenient:
        settings["ignore_unknown_options"] = True
    return click.Command(
        PROG,
        params=[*global_params(), *worker_params(),
                *[p for p in ccworker_params() if not shadowed(p, extra)], *extra],
        context_settings=settings,
        add_help_option=not lenient,
        options_metavar="[OPTIONS] [worker|check] [-- KEY=VALUE ...]",
        help="Start a ccworker (same options as `celery worker`).\n\n"
             "\b\n  ccworker -A proj -l INFO\n  ccworker -A proj worker -l INFO -Q hipri,lopri"
             "\n\n`ccworker check -A proj [options]` loads the project as the worker would "
             "and reports what ccworker would not do as `celery worker` does; exit status "
             "0 (nothing), 1 (something differs), 2 (the project cannot be loaded).",
    )
