"""``-A check``: a project named like ccworker's ``check`` sub-command."""
from celery import Celery

app = Celery("check", broker="redis://127.0.0.1:1/0", set_as_current=False)
