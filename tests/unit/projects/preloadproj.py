"""An app with its own preload and worker options and signal receivers."""
import click
from celery import Celery, signals

app = Celery("preloadproj", broker="memory://", set_as_current=False)
app.user_options["preload"].add(
    click.Option(["-Z", "--template"], default="default-template", help="a preload option"))
app.user_options["worker"].add(
    click.Option(["--monitoring/--no-monitoring"], default=False, help="a worker option"))

received = []


@signals.user_preload_options.connect
def on_preload(app=None, options=None, **kwargs):
    received.append(("user_preload_options", dict(options)))


@signals.celeryd_init.connect
def on_celeryd_init(sender=None, instance=None, conf=None, options=None, **kwargs):
    received.append(("celeryd_init", sender, sorted(options)))
    # Settings changed here must still count (Celery reads them afterwards).
    conf.task_time_limit = 99


@signals.import_modules.connect
def on_import_modules(sender=None, **kwargs):
    received.append(("import_modules",))


@signals.worker_init.connect
def on_worker_init(sender=None, **kwargs):
    received.append(("worker_init", sender.hostname, sender.app.main))
