"""A project that stamps its canvases, for ``revoke_by_stamped_headers`` and ``--statedb``.

Same ``CC_TEST_*`` configuration as ``proj_basic`` (see its ``celery.py``).
Tasks are sent stamped by a `StampingVisitor`, the way Celery's docs show
it (``sig.stamp(visitor=...)``), and operators revoke them by stamp.
"""

from .celery import app

__all__ = ("app",)
