"""A minimal Django project laid out as Celery's Django guide says."""
from .celery import app as celery_app

__all__ = ("celery_app",)
