"""``-A anyname``: neither ``app`` nor ``celery``; found by scanning globals."""
from celery import Celery

unrelated = object()
my_application = Celery("anyname", broker="memory://", set_as_current=False)
