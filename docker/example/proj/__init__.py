"""An ordinary Celery project, unchanged by ccworker: used by the demo and docker/."""
