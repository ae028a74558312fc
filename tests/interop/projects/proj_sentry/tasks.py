import sentry_sdk

from .celery import app


@app.task
def fail(message):
    """Raises: the exception must reach Sentry, with the task's tags."""
    sentry_sdk.add_breadcrumb(category="task", message=f"about to fail with {message}")
    raise ValueError(message)


@app.task
def ok(x):
    return x * 2
