SECRET_KEY = "not-secret"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "djapp"]
DATABASES = {}

CELERY_BROKER_URL = "memory://"
CELERY_WORKER_PREFETCH_MULTIPLIER = 2
CELERY_TASK_TIME_LIMIT = 60
CELERY_TASK_DEFAULT_QUEUE = "djqueue"
