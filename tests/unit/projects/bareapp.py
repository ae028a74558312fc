"""An app that never calls config_from_object (so --config applies)."""
from celery import Celery

app = Celery("bareapp", set_as_current=False)
