"""A package whose ``celery.py`` fails to import."""
