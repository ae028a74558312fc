"""A Django project wired to Celery exactly as Celery's Django guide says.

``djproj_interop/celery.py`` creates the app, the package ``__init__`` exports
it as ``celery_app`` (so ``celery -A djproj_interop`` finds it through the
``celery`` submodule), Celery settings live in Django's settings with the
``CELERY_`` prefix, and tasks are ``shared_task``s in an installed app's
``tasks.py``, found by ``autodiscover_tasks()``.
"""

from .celery import app as celery_app

__all__ = ("celery_app",)
