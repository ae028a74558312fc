"""``-A attrproj:second`` / ``-A attrproj.second`` pick a named instance."""
from celery import Celery

app = Celery("attrproj-first", broker="memory://", set_as_current=False)
second = Celery("attrproj-second", broker="memory://", set_as_current=False)
not_an_app = 42
