"""Found by ``app.autodiscover_tasks()`` once Django's apps are ready."""
from celery import shared_task


@shared_task
def mul(x, y):
    return x * y
