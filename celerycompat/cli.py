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

This module only parses; what ``celery worker`` does with the result (boot
the app, resolve the options, start) is :mod:`celerycompat.boot`.

Environment variables, as Celery's ``auto_envvar_prefix="CELERY"`` gives
them: global options read ``APP``/``CELERY_APP``, ``BROKER_URL``/
``CELERY_BROKER``, ``RESULT_BACKEND``/``CELERY_RESULT_BACKEND``,
``LOADER``/``CELERY_LOADER``, ``CONFIG_MODULE``/``CELERY_CONFIG``,
``CELERY_WORKDIR``, ``NO_COLOR``/``CELERY_NO_COLOR``, ``CELERY_QUIET``,
``SKIP_CHECKS``/``CELERY_SKIP_CHECKS``; worker options read
``CELERY_WORKER_<OPTION>`` (e.g. ``CELERY_WORKER_LOGLEVEL``).
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import click
from click.core import ParameterSource

from celerycompat import __version__, apploader, boot
from celerycompat import options as opts
from celerycompat.boot import Runner, worker_options
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


def build_worker_options(argv: Sequence[str], boot: bool = False) -> opts.WorkerOptions:
    """Command line -> :class:`WorkerOptions` (`celerycompat.boot.worker_options`)."""
    return worker_options(parse_command_line(argv), boot)


def parse_worker_options(argv: Sequence[str]) -> opts.WorkerOptions:
    """Command line -> :class:`WorkerOptions` without booting the app (tests,
    tooling): the app is imported and configured, no task modules imported."""
    return build_worker_options(argv, boot=False)


# --------------------------------------------------------------------------
# Running


def run(argv: Sequence[str], runner: Optional[Runner] = None) -> int:
    """Parse ``argv`` and do what it asks (`celerycompat.boot.run`); the exit code."""
    from celerycompat.execution import tracer

    # Before the project is imported: instrumentation it installs (Sentry's
    # Celery integration) must wrap ccworker's tracer factory.
    tracer.install()
    return boot.run(parse_command_line(argv), argv, runner)


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
