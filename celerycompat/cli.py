"""The ``ccworker`` command: ``celery [global options] worker [options]`` in one.

Every option of ``celery worker`` 5.7 and every global option of ``celery``
is accepted with the same names, types, choices, defaults and environment
variables (defined in celerycompat/cli_params.py), in any order, so a ``celery`` command line keeps
working with the program name replaced: ``ccworker -A proj worker -l INFO``
(the literal ``worker`` is ignored), ``ccworker -l INFO -A proj``, trailing
``key=value`` settings (``-- worker.prefetch_multiplier=1``).

One sub-command of ccworker's own: ``ccworker check -A proj [worker options]``
(the word anywhere a ``worker`` word may stand) loads the project as the
worker would and reports what ccworker would not do as Celery does
(:mod:`celerycompat.check`), instead of starting a worker.

Why two parsing passes: the app may declare its own click options
(``app.user_options['preload']`` and ``['worker']``) which can only be known
after ``-A`` is imported. Celery gets this for free because its group
callback loads the app before the ``worker`` sub-command's options are
parsed. ccworker is one command, so pass 1 reads the known options while
letting unknown ones through (to find ``-A``, ``--workdir`` and friends),
the app is loaded, and pass 2 parses strictly with the app's options added.
Unknown options are then a usage error, as in Celery.

Environment variables, as Celery's ``auto_envvar_prefix="CELERY"`` gives
them: global options read ``APP``/``CELERY_APP``, ``BROKER_URL``/
``CELERY_BROKER``, ``RESULT_BACKEND``/``CELERY_RESULT_BACKEND``,
``LOADER``/``CELERY_LOADER``, ``CONFIG_MODULE``/``CELERY_CONFIG``,
``CELERY_WORKDIR``, ``NO_COLOR``/``CELERY_NO_COLOR``, ``CELERY_QUIET``,
``SKIP_CHECKS``/``CELERY_SKIP_CHECKS``; worker options read
``CELERY_WORKER_<OPTION>`` (e.g. ``CELERY_WORKER_LOGLEVEL``).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import click
from click.core import ParameterSource

from celerycompat import __version__, apploader, beat, logsetup
from celerycompat import options as opts
from celerycompat.celery_release import has_setting
from celerycompat.cli_params import (
    GLOBAL_NAMES,
    OWN_NAMES,
    PROG,
    WORKER_ENV_PREFIX,
    build_command,
    ccworker_params,
    shadowed,
)

#: Leading words accepted where ``celery`` has its sub-command: ``worker``
#: (ignored: it is what ccworker runs) and ccworker's own ``check``.
COMMANDS = ("worker", "check")


# --------------------------------------------------------------------------
# Parsing


@dataclass
class CommandLine:
    """Pass-2 result: the loaded app and every value as click gave it."""

    app: Any
    params: dict[str, Any]
    explicit: frozenset[str]
    """Options set on the command line or by environment variable."""
    config_args: list[str]
    """Trailing ``key=value`` settings (the literal ``worker`` removed)."""
    preload_names: frozenset[str]
    user_option_names: frozenset[str]
    ctx: click.Context
    own_names: frozenset[str] = frozenset(OWN_NAMES)
    """ccworker's own options in effect (not shadowed by the app's)."""
    command: str = "worker"
    """``worker`` (start one) or ``check`` (report, see :mod:`celerycompat.check`)."""

    @property
    def worker_params(self) -> dict[str, Any]:
        """What Celery's ``worker`` callback gets: worker and user options,
        plus the global ``-C``/``-q`` it forwards."""
        drop = (set(GLOBAL_NAMES) - {"no_color", "quiet"}) | self.own_names
        return {k: v for k, v in self.params.items() if k not in drop}


def _context(command: click.Command, argv: Sequence[str],
             resilient: bool = False) -> click.Context:
    return command.make_context(PROG, list(argv), auto_envvar_prefix=WORKER_ENV_PREFIX,
                                resilient_parsing=resilient)


def _export_globals(params: dict[str, Any]) -> None:
    """Celery hands ``--loader/-b/--result-backend/--config/--skip-checks`` to
    the app through environment variables, before importing it; the app's
    configuration reads them (``broker_url`` and ``result_backend`` at every
    access, so they beat any setting), and so do child processes."""
    exports = {"loader": "CELERY_LOADER", "broker": "CELERY_BROKER_URL",
               "result_backend": "CELERY_RESULT_BACKEND", "config": "CELERY_CONFIG_MODULE"}
    for name, variable in exports.items():
        if params.get(name):
            os.environ[variable] = params[name]
    if params.get("skip_checks"):
        os.environ["CELERY_SKIP_CHECKS"] = "true"


def _load_app(ctx: click.Context, spec: Optional[str], workdir: Optional[str]) -> Any:
    """:func:`apploader.load_app` with Celery's messages on failure (exit 2)."""
    head = "\nUnable to load celery application.\n"
    try:
        return apploader.load_app(spec, workdir)
    except ModuleNotFoundError as exc:
        if exc.name != spec:
            ctx.fail(f"{head}While trying to load the module {spec} the following "
                     f"error occurred:\n{traceback.format_exc()}")
        ctx.fail(f"{head}The module {exc.name} was not found.")
    except AttributeError as exc:
        ctx.fail(f"{head}{str(exc.args[0]).capitalize() if exc.args else exc}")
    except Exception:
        ctx.fail(f"{head}While trying to load the module {spec} the following "
                 f"error occurred:\n{traceback.format_exc()}")


def _user_options(app: Any) -> tuple[list[click.Parameter], list[click.Parameter]]:
    user = getattr(app, "user_options", None) or {}
    return list(user.get("preload", ())), list(user.get("worker", ()))


def version_text() -> str:
    import celery
    return f"celerycompat {__version__} (celery {celery.__version__})"


def parse_command_line(argv: Sequence[str]) -> CommandLine:
    """Both parsing passes, with the side effects Celery has on the way:
    ``--version`` exits, ``--workdir`` is entered, globals are exported to the
    environment and the app is imported.

    Raises:
        click.exceptions.Exit: after ``--version`` or ``--help``.
        click.UsageError: unknown option, bad value, app not loadable.
    """
    # Pass 1 is resilient: a value it cannot convert may belong to an app
    # option it does not know yet (``-Zlx`` is ``-Z lx``, not ``-l x``);
    # pass 2 reports real errors.
    first = _context(build_command(lenient=True), argv, resilient=True)
    if first.params.get("version"):
        click.echo(version_text())
        first.exit(0)
    _export_globals(first.params)
    app = _load_app(first, first.params.get("app"), first.params.get("workdir"))
    preload, worker_extra = _user_options(app)
    ctx = _context(build_command([*preload, *worker_extra]), argv)
    explicit = frozenset(
        name for name in ctx.params
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                              ParameterSource.ENVIRONMENT))
    config_args = list(ctx.args)
    command = "worker"
    if config_args and config_args[0] in COMMANDS:
        command = config_args.pop(0)
    return CommandLine(
        app=app, params=dict(ctx.params), explicit=explicit, config_args=config_args,
        preload_names=frozenset(p.name for p in preload if p.name),
        user_option_names=frozenset(p.name for p in [*preload, *worker_extra] if p.name),
        ctx=ctx,
        own_names=frozenset(p.name for p in ccworker_params()
                            if p.name and not shadowed(p, [*preload, *worker_extra])),
        command=command,
    )


def _send_preload(cl: CommandLine) -> None:
    """``user_preload_options`` with the app's preload values, as Celery sends
    it when the ``worker`` command starts (before ``key=value`` settings)."""
    from celery.signals import user_preload_options

    values = {name: cl.params[name] for name in sorted(cl.preload_names) if name in cl.params}
    if values:
        user_preload_options.send(sender=main, app=cl.app, options=values)


def _apply_config_args(cl: CommandLine) -> None:
    """Trailing ``key=value`` settings through Celery's own parser, with the
    ``worker`` namespace for ``.key``/``_key`` (wire contract H3)."""
    if not cl.config_args:
        return
    try:
        cl.app.config_from_cmdline(cl.config_args, namespace="worker")
    except (KeyError, ValueError) as exc:
        raise click.UsageError("Unable to parse extra configuration from command line.\n"
                               f"Reason: {exc}", ctx=cl.ctx) from exc


def build_worker_options(argv: Sequence[str], boot: bool = False) -> opts.WorkerOptions:
    """Command line -> :class:`WorkerOptions`, in ``celery worker``'s order.

    With ``boot`` the app is also made ready for work: privileges dropped
    (``--uid/--gid``), task modules imported (``import_modules``, Django
    setup, autodiscovery), app finalized, ``celeryd_init`` before and
    ``worker_init`` after option resolution (see :mod:`celerycompat.apploader`).
    """
    return options_from_command_line(parse_command_line(argv), boot)


def _configure(cl: CommandLine) -> dict[str, Any]:
    """What ``celery worker`` does before anything of the worker (and before
    ``-D`` detaches): the worker's keyword arguments, ``user_preload_options``
    sent, ``--disable-prefetch`` and trailing ``key=value`` settings applied."""
    args = opts.worker_arguments(cl.app, cl.worker_params)
    _send_preload(cl)
    disable_prefetch = args.pop("disable_prefetch")
    if has_setting("worker_disable_prefetch"):  # Celery >= 5.6 writes it back
        cl.app.conf.worker_disable_prefetch = disable_prefetch
    _apply_config_args(cl)
    return args


def options_from_command_line(cl: CommandLine, boot: bool = False) -> opts.WorkerOptions:
    """:func:`build_worker_options` for an already parsed command line."""
    app = cl.app
    args = _configure(cl)
    instance = None
    if boot:
        from celery.platforms import maybe_drop_privileges

        maybe_drop_privileges(uid=args.get("uid"), gid=args.get("gid"))
        instance = apploader.prepare_app_for_worker(app, args["hostname"], args)
    try:
        options = opts.resolve_worker_options(app, args, cl.explicit, cl.user_option_names)
    except ValueError as exc:
        raise click.UsageError(str(exc), ctx=cl.ctx) from exc
    _set_own_options(options, cl)
    if boot:
        from celery.exceptions import ImproperlyConfigured

        from celerycompat.consumer.queues import select_queues

        try:
            options.consume_queues = select_queues(
                app, options.queues, options.exclude_queues, options.nodename)
        except ImproperlyConfigured as exc:
            raise click.UsageError(str(exc), ctx=cl.ctx) from exc
        apploader.init_worker_side(options, instance)
    return options


def _set_own_options(options: opts.WorkerOptions, cl: CommandLine) -> None:
    """ccworker's own options into ``options.observability``; one warning line
    per own option the app's options shadow."""
    from celerycompat.observability.settings import ObservabilitySettings

    own = {name: cl.params[name] for name in cl.own_names if name in cl.params}
    defaults = ObservabilitySettings()
    options.observability = ObservabilitySettings(
        metrics_port=own.get("metrics_port"),
        metrics_host=own.get("metrics_host") or defaults.metrics_host,
        stall_timeout=float(own.get("health_stall_timeout") or defaults.stall_timeout),
        log_format=own.get("log_format") or defaults.log_format,
    )
    for name in sorted(set(OWN_NAMES) - cl.own_names):
        flag = "--" + name.replace("_", "-")
        options.unsupported.append(f"ccworker: the app declares its own {flag} option; "
                                   f"ccworker's {flag} is not available")


def parse_worker_options(argv: Sequence[str]) -> opts.WorkerOptions:
    """Command line -> :class:`WorkerOptions` without booting the app (tests,
    tooling): the app is imported and configured, no task modules imported."""
    return build_worker_options(argv, boot=False)


# --------------------------------------------------------------------------
# Running


Runner = Callable[[opts.WorkerOptions], int]


def _default_runner(options: opts.WorkerOptions) -> int:
    from celerycompat import worker  # imported late: pulls in the whole worker

    return worker.run(options)


def run(argv: Sequence[str], runner: Optional[Runner] = None) -> int:
    """Start a worker from ``argv`` (or, with ``check``, report on the project);
    returns the exit code.

    ``-B`` next to a green pool is refused after booting (exit 1), where
    Celery refuses it. Order after booting (as Celery's ``Worker`` does it): logging through
    ``app.log`` (nodename-formatted logfile, ``setup_logging`` signals), one
    warning per ignored flag, the pidfile (refuses to start while its pid is
    alive, removed at exit), stdout/stderr redirected to the log
    (``worker_redirect_stdouts``; banners belong on ``sys.__stdout__``),
    then the worker.
    """
    from celery.platforms import create_pidlock

    from celerycompat.execution import tracer

    # Before the project is imported: instrumentation it installs (Sentry's
    # Celery integration) must wrap ccworker's tracer factory.
    tracer.install()
    cl = parse_command_line(argv)
    if cl.command == "check":
        from celerycompat import check

        return check.run(lambda: options_from_command_line(cl, boot=True))
    if cl.params.get("detach"):
        from celerycompat import daemon

        return daemon.detach(argv, _configure(cl), cl.app)
    options = options_from_command_line(cl, boot=True)
    refused = beat.refusal(options)
    if refused:
        # Where Celery refuses it (its Beat bootstep, after worker_init), and
        # with the last line of Celery's traceback.
        click.echo(f"celery.exceptions.ImproperlyConfigured: {refused}", err=True)
        return 1
    custom_logging = logsetup.setup_logging(options)
    logsetup.warn_unsupported(options.unsupported)
    pidlock = create_pidlock(options.pidfile) if options.pidfile else None
    try:
        logsetup.redirect_stdouts(options, custom_logging)
        return int((runner or _default_runner)(options) or 0)
    except Exception as exc:
        # Celery's worker logs this one line (with the traceback) and exits 1.
        # Left to the interpreter, the traceback would go through the
        # redirected stderr one fragment per log record.
        logging.getLogger("celery.worker.worker").critical(
            "Unrecoverable error: %r", exc, exc_info=True)
        return 1
    finally:
        logsetup.restore_stdouts()
        if pidlock is not None:
            pidlock.release()


def main(argv: Optional[Sequence[str]] = None, runner: Optional[Runner] = None) -> None:
    """Console-script entry point: ``ccworker`` and ``python -m celerycompat``.

    Exits with the worker's code; usage errors exit 2 after click's message,
    ``SecurityError`` (root with pickle, failed privilege drop) exits 1.
    """
    from celery.exceptions import SecurityError

    args = sys.argv[1:] if argv is None else list(argv)
    try:
        code = run(args, runner)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.Abort:
        click.echo("Aborted!", err=True)
        code = 1
    except SecurityError as exc:
        click.echo(exc.args[0] if exc.args else str(exc), err=True)
        code = 1
    sys.exit(code)
