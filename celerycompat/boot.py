"""From a parsed command line to a running worker's parts.

`celerycompat.cli` only parses (two passes, the app loaded in between) and
hands the result here, which does what ``celery worker`` does next, in its
order: the worker's keyword arguments, ``user_preload_options``, trailing
``key=value`` settings (`configure`, which is also all ``-D`` needs before it
detaches: `celerycompat.daemon`); then, to boot, privileges dropped, the
task modules imported and ``celeryd_init``/``worker_init`` sent
(`celerycompat.apploader`), the options resolved and the queues selected
(`worker_options`, which ``ccworker check`` uses too); then logging, one
warning per ignored flag, the pidfile and the redirected stdio around the
worker itself (`start`). The worker (`celerycompat.worker`) owns the
running process: its parts, signals and shutdown.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import click

from celerycompat import apploader, beat, logsetup
from celerycompat import options as opts
from celerycompat.celery_release import has_setting
from celerycompat.cli_params import OWN_NAMES

if TYPE_CHECKING:
    from celerycompat.cli import CommandLine

Runner = Callable[[opts.WorkerOptions], int]


def _send_preload(cl: CommandLine) -> None:
    """``user_preload_options`` with the app's preload values, as Celery sends
    it when the ``worker`` command starts (before ``key=value`` settings)."""
    from celery.signals import user_preload_options

    values = {name: cl.params[name] for name in sorted(cl.preload_names) if name in cl.params}
    if values:
        user_preload_options.send(sender=run, app=cl.app, options=values)


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


def configure(cl: CommandLine) -> dict[str, Any]:
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


def worker_options(cl: CommandLine, boot: bool = False) -> opts.WorkerOptions:
    """The parsed command line as :class:`WorkerOptions`, in ``celery worker``'s order.

    With ``boot`` the app is also made ready for work: privileges dropped
    (``--uid/--gid``), task modules imported (``import_modules``, Django
    setup, autodiscovery), app finalized, ``celeryd_init`` before and
    ``worker_init`` after option resolution (see :mod:`celerycompat.apploader`),
    the queues to consume selected.
    """
    app = cl.app
    args = configure(cl)
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
    options.app_spec = cl.params.get("app")
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


def _default_runner(options: opts.WorkerOptions) -> int:
    from celerycompat import worker  # imported late: pulls in the whole worker

    return worker.run(options)


def run(cl: CommandLine, argv: Sequence[str], runner: Optional[Runner] = None) -> int:
    """What the command line asks for: a report (``check``), a detached worker
    (``-D``: ``argv`` is exec'd again without it) or a worker here; the exit code."""
    if cl.command == "check":
        from celerycompat import check

        return check.run(lambda: worker_options(cl, boot=True))
    if cl.params.get("detach"):
        from celerycompat import daemon

        return daemon.detach(argv, configure(cl), cl.app)
    return start(worker_options(cl, boot=True), runner)


def start(options: opts.WorkerOptions, runner: Optional[Runner] = None) -> int:
    """Run a booted worker; returns the exit code.

    ``-B`` next to a green pool is refused here (exit 1), where Celery
    refuses it. Then, as Celery's ``Worker`` does it: logging through
    ``app.log`` (nodename-formatted logfile, ``setup_logging`` signals), one
    warning per ignored flag, the pidfile (refuses to start while its pid is
    alive, removed at exit), stdout/stderr redirected to the log
    (``worker_redirect_stdouts``; banners belong on ``sys.__stdout__``),
    then the worker.
    """
    from celery.platforms import create_pidlock

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
