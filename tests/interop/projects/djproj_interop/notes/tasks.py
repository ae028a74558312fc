"""Tasks of the ``notes`` app: ``shared_task``, the ORM, nothing Celery-specific."""

from celery import shared_task

from .models import Note


@shared_task
def add_note(label):
    """Insert a row, return how many rows there are and their labels."""
    Note.objects.create(label=label)
    return {"count": Note.objects.count(),
            "labels": list(Note.objects.values_list("label", flat=True))}


@shared_task(bind=True)
def count_notes(self):
    return Note.objects.count()
