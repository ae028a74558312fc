"""``-A celeryattr``: no ``app``, the app is called ``celery``."""
from celery import Celery

celery = Celery("celeryattr", broker="memory://", set_as_current=False)
