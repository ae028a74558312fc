"""A module without any Celery app."""
VALUE = 1
