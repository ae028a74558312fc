"""A project with Celery's message signing and remote control switchable.

Used by tests/interop/test_hostile_input.py for what ``proj_basic`` cannot
be configured to do: sign every message (``app.setup_security``) and turn
the remote-control mailbox off. See ``celery.py`` for the variables.
"""

from .celery import app

__all__ = ("app",)
