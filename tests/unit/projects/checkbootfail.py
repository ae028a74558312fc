"""``ccworker check -A checkbootfail``: the app loads, its task module does not."""
from celery import Celery

app = Celery("checkbootfail", broker="redis://127.0.0.1:1/0", set_as_current=False,
             include=["checkbootfail_missing_tasks_module"])
