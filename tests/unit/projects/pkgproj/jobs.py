"""Imported through ``imports`` when the worker boots."""
from pkgproj.celery import app


@app.task
def job():
    return "job"
