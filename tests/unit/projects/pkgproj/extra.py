"""Imported through ``-I pkgproj.extra``."""
from pkgproj.celery import app


@app.task
def extra():
    return "extra"
