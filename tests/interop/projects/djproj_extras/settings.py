"""Django settings; the Celery ones (``CELERY_*``) come from ``CC_TEST_*`` variables.

The sqlite database is per worker (named after its queue, in
``CC_TEST_DJANGO_DIR``), so two workers' rows never mix and a client
process with the same variables reads the worker's database.
"""

import os
import tempfile

SECRET_KEY = "djproj-extras-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django_celery_beat",
    "django_celery_results",
    "djproj_extras.probes",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(
            os.environ.get("CC_TEST_DJANGO_DIR", tempfile.gettempdir()),
            os.environ.get("CC_TEST_QUEUE", "djproj_extras") + ".sqlite3",
        ),
        # The beat child, the worker and a client process share the file.
        "OPTIONS": {"timeout": 20},
    }
}

CELERY_BROKER_URL = os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10")
CELERY_RESULT_BACKEND = os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11")
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CC_TEST_QUEUE", "celery")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_RESULT_EXTENDED = True
CELERY_BEAT_SCHEDULE = {
    "tick-every-second": {"task": "djproj_extras.probes.tasks.tick", "schedule": 1.0},
}
