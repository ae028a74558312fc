"""An app whose settings differ from every default, to see flags win."""
from celery import Celery

app = Celery("confproj", broker="memory://", set_as_current=False)
app.conf.update(
    worker_concurrency=3,
    worker_prefetch_multiplier=7,
    worker_send_task_events=True,
    task_time_limit=30,
    task_soft_time_limit=20,
    worker_max_tasks_per_child=11,
    worker_max_memory_per_child=12000,
    worker_state_db="/tmp/state-%n.db",
    beat_schedule_filename="/tmp/beat-%n",
    worker_pool="solo",
)
