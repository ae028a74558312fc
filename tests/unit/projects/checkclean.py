"""``ccworker check -A checkclean``: an ordinary project, nothing to report."""
from celery import Celery

app = Celery("checkclean", broker="redis://127.0.0.1:1/0", set_as_current=False)


@app.task
def add(x, y):
    return x + y
