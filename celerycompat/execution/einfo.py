"""The task's own exception out of billiard's cross-process wrapper.

billiard 4 (Celery >= 5.3) wraps an exception raised in a pool child in
``ExceptionWithTraceback`` so its traceback survives pickling; log lines and
stored results show the task's own exception, as Celery's do. billiard 3.6
(Celery 5.2) has no such wrapper, so there is nothing to unwrap there.
"""

from __future__ import annotations

from typing import Any

try:
    from billiard.einfo import ExceptionWithTraceback
except ImportError:  # billiard < 4
    ExceptionWithTraceback = None


def unwrap(exc: Any) -> Any:
    """``exc`` itself, or the exception it carries if billiard wrapped it."""
    if ExceptionWithTraceback is not None and isinstance(exc, ExceptionWithTraceback):
        return exc.exc
    return exc
