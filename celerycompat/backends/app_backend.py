"""Any other result backend: a thin adapter over the app's own backend object.

Database, memcached, S3, django-celery-results, user subclasses that override
how results are stored... Celery's backend object already implements them
correctly, so we call it with exactly the arguments Celery's worker would.
The only translation is ``mark_as_started``: Celery's tracer stores STARTED
through ``store_result`` with the request (``Backend.mark_as_started`` takes
no request), and so do we.
"""

from __future__ import annotations

from typing import Any

from celery import states

__all__ = ("AppBackendStore",)


class AppBackendStore:
    """Delegates every call to ``backend`` (normally ``app.backend``).

    Thread safety is the backend's own, as under ``celery worker`` with a
    threads pool.
    """

    def __init__(self, app: Any, backend: Any) -> None:
        self.app = app
        self.backend = backend

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
    ) -> Any:
        return self.backend.store_result(
            task_id, result, state, traceback=traceback, request=request
        )

    def mark_as_started(self, task_id: str, meta: dict, request: Any = None) -> None:
        self.backend.store_result(task_id, meta, states.STARTED, request=request)

    def mark_as_done(
        self, task_id: str, result: Any, request: Any = None, store_result: bool = True
    ) -> None:
        self.backend.mark_as_done(task_id, result, request=request, store_result=store_result)

    def mark_as_failure(
        self,
        task_id: str,
        exc: BaseException,
        traceback: str | None = None,
        request: Any = None,
        store_result: bool = True,
        call_errbacks: bool = True,
    ) -> None:
        self.backend.mark_as_failure(
            task_id, exc, traceback=traceback, request=request,
            store_result=store_result, call_errbacks=call_errbacks,
        )

    def mark_as_retry(
        self, task_id: str, exc: BaseException, traceback: str | None = None, request: Any = None
    ) -> Any:
        return self.backend.mark_as_retry(task_id, exc, traceback=traceback, request=request)

    def mark_as_revoked(
        self, task_id: str, reason: str = "", request: Any = None, store_result: bool = True
    ) -> None:
        self.backend.mark_as_revoked(task_id, reason, request=request, store_result=store_result)

    def process_cleanup(self) -> None:
        self.backend.process_cleanup()

    def __repr__(self) -> str:
        return f"<AppBackendStore for {type(self.backend).__name__}>"
