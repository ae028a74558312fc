"""A project with one periodic task, for ``-B`` (embedded beat).

``beat_schedule`` runs ``proj_beat.tasks.tick`` every second on the
worker's own queue (``CC_TEST_QUEUE``); each run and each beat signal is
recorded (``ccit_recorder``), so a test counts runs per worker and sees
which process the schedule ran in.
"""

from .celery import app

__all__ = ("app",)
