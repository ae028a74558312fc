"""A Django project with the Django add-ons Celery deployments use.

Laid out as Celery's Django guide says (``celery_app`` exported here,
``CELERY_`` settings, ``autodiscover_tasks``), with ``django_celery_beat``
(its ``DatabaseScheduler`` for ``-B --scheduler``) and
``django_celery_results`` (``CELERY_RESULT_BACKEND=django-db`` when the test
sets ``CC_TEST_BACKEND`` so). The ``probes`` app holds the tasks, and
``celery.py`` the signal receivers that show what Celery's Django fixup
does to database connections around each task.
"""

from .celery import app as celery_app

__all__ = ("celery_app",)
