from .celery import app


@app.task(bind=True)
def parent(self, x):
    """Publishes a child task from inside a run: a producer span, and the
    child's run span continuing the same trace."""
    child.delay(x + 1)
    return x


@app.task
def child(x):
    return x * 10


@app.task
def broken(message):
    raise KeyError(message)
