"""An app that declares its own ``--metrics-port`` worker option (its own exporter)."""
import click
from celery import Celery

app = Celery("ownmetricsproj", broker="memory://", set_as_current=False)
app.user_options["worker"].add(
    click.Option(["--metrics-port"], default="app-default", help="the app's own option"))
