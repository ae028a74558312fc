"""Django settings; the Celery ones (``CELERY_*``) come from the environment.

``CC_TEST_BROKER``/``CC_TEST_BACKEND``/``CC_TEST_QUEUE`` are set by the
interop harness per worker; the sqlite database is per worker too (named
after its queue, in ``CC_TEST_DJANGO_DIR``) so two workers' counts never mix.
"""

import os
import tempfile

SECRET_KEY = "djproj-interop-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "djproj_interop.notes",
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(
            os.environ.get("CC_TEST_DJANGO_DIR", tempfile.gettempdir()),
            os.environ.get("CC_TEST_QUEUE", "djproj_interop") + ".sqlite3",
        ),
    }
}

CELERY_BROKER_URL = os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10")
CELERY_RESULT_BACKEND = os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11")
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("CC_TEST_QUEUE", "celery")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_EXTENDED = True
