"""``-A pkgproj``: a package whose app lives in ``pkgproj/celery.py``."""
