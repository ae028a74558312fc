"""``-A plainmod``: the app is the module's ``app`` attribute."""
from celery import Celery

app = Celery("plainmod", broker="memory://", set_as_current=False)


@app.task
def add(x, y):
    return x + y
