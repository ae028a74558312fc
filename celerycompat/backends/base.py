"""The ``ResultStore`` interface and what every native store shares.

A native store replaces only the *write* of the meta document (the part on
every task's hot path). Everything a Celery backend does around that write
stays Celery's: chord part return, failing the rest of a chain, errbacks.
Those side effects are delegated to the app's backend object (its own
``on_chord_part_return``, ``_fail_chain``, ``_call_task_errbacks``), so a
canvas behaves exactly as under ``celery worker`` while the common path is
ours.

Method names and arguments follow ``celery.backends.base.Backend`` so the
execution layer can treat a native store and Celery's backend alike.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Protocol

from celery import states
from celery._state import get_current_task
from celery.exceptions import BackendStoreError, TaskRevokedError

from .. import celery_release
from ..protocol import codecs, results

__all__ = ("ResultStore", "NativeStore", "MetaEncoder")


class ResultStore(Protocol):
    """Where a worker stores task states; see docs/design.md."""

    def mark_as_started(self, task_id: str, meta: dict, request: Any) -> None: ...

    def mark_as_done(
        self, task_id: str, result: Any, request: Any, store_result: bool = True
    ) -> None: ...

    def mark_as_failure(
        self,
        task_id: str,
        exc: BaseException,
        traceback: str | None,
        request: Any,
        store_result: bool = True,
        call_errbacks: bool = True,
    ) -> None: ...

    def mark_as_retry(
        self, task_id: str, exc: BaseException, traceback: str | None, request: Any
    ) -> None: ...

    def mark_as_revoked(
        self, task_id: str, reason: str, request: Any, store_result: bool = True
    ) -> None: ...

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
    ) -> Any: ...

    def process_cleanup(self) -> None: ...


class MetaEncoder:
    """Builds and serializes meta documents with one backend's settings.

    The settings are read once from the Celery backend object (serializer,
    ``result_extended``, the app clock) because they do not change while a
    worker runs; reading ``app.conf`` on every store costs more than the
    encode itself.
    """

    def __init__(self, app: Any, backend: Any) -> None:
        self.serializer: str = backend.serializer
        self.extended = bool(app.conf.find_value_for_key("extended", "result"))
        self.now = celery_release.result_clock(app)
        self.stamps = celery_release.result_stamps()

    def encode(self, obj: Any) -> bytes:
        """Serialize with the result serializer (no compression)."""
        return codecs.dumps(obj, self.serializer)[2]

    def encode_result(self, result: Any, state: str) -> Any:
        return results.encode_result(result, state, self.serializer, self.encode)

    def meta(
        self,
        task_id: str | None,
        result: Any,
        state: str,
        traceback: str | None,
        request: Any,
    ) -> dict:
        """Meta for an already-encoded ``result``; ``task_id`` None = omit it."""
        # Celery's current_task_children: without a request, the children
        # of the task currently executing in this thread (if any).
        children_request = request or getattr(get_current_task(), "request", None)
        return results.result_meta(
            result,
            state,
            traceback,
            request,
            now=self.now,
            extended=self.extended,
            children=results.request_children(children_request),
            task_id=task_id,
            stamps=self.stamps,
        )


def ignores_result(request: Any) -> bool:
    return bool(request is not None and request.ignore_result)


class NativeStore:
    """Shared ``mark_as_*`` logic: Celery's control flow, our meta write.

    Subclasses implement :meth:`_store` (write one encoded result). The
    order of write and side effects is Celery's (``Backend.mark_as_*``):
    the state is stored before the chord/chain/errback machinery runs, so
    anything triggered by it already sees the stored state.
    """

    #: Whether ``store_result`` goes through the backend's retry helper
    #: (``result_backend_always_retry``). The RPC backend publishes instead
    #: and has its own retry policy on the producer.
    uses_store_retry = True

    def __init__(self, app: Any, backend: Any) -> None:
        self.app = app
        self.backend = backend
        self.encoder = MetaEncoder(app, backend)

    # -- the one thing a subclass provides ------------------------------------

    def _store(
        self, task_id: str, result: Any, state: str, traceback: str | None, request: Any
    ) -> None:
        raise NotImplementedError

    # -- Celery's Backend API -------------------------------------------------

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
    ) -> Any:
        """Encode ``result`` for ``state`` and store it; returns the encoded value."""
        encoded = self.encoder.encode_result(result, state)
        retry = getattr(self.backend, "_ensure_retryable", None)
        if self.uses_store_retry and retry is not None:
            retry(
                self._store,
                task_id,
                encoded,
                state,
                traceback,
                request,
                fallback_exc=partial(BackendStoreError, task_id=task_id, state=state),
                fallback_msg="failed to store result on the backend",
            )
        else:
            self._store(task_id, encoded, state, traceback, request)
        return encoded

    def mark_as_started(self, task_id: str, meta: dict, request: Any = None) -> None:
        self.store_result(task_id, meta, states.STARTED, request=request)

    def mark_as_done(
        self,
        task_id: str,
        result: Any,
        request: Any = None,
        store_result: bool = True,
        state: str = states.SUCCESS,
    ) -> None:
        if store_result and not ignores_result(request):
            self.store_result(task_id, result, state, request=request)
        if request and request.chord:
            self.backend.on_chord_part_return(request, state, result)

    def mark_as_failure(
        self,
        task_id: str,
        exc: BaseException,
        traceback: str | None = None,
        request: Any = None,
        store_result: bool = True,
        call_errbacks: bool = True,
        state: str = states.FAILURE,
    ) -> None:
        backend = self.backend
        if not hasattr(backend, "_fail_chain"):
            # A release without _fail_chain (Celery 5.2) propagates a failure
            # along a chain inside its own mark_as_failure: let it do all of it.
            backend.mark_as_failure(task_id, exc, traceback, request, store_result=store_result,
                                    call_errbacks=call_errbacks, state=state)
            return
        if store_result:
            self.store_result(task_id, exc, state, traceback=traceback, request=request)
        if not request:
            return
        if request.chord:
            backend.on_chord_part_return(request, state, exc)
        # Later chain steps are stored through Celery's backend: rare, and
        # its _fail_chain also walks chord bodies (C23).
        backend._fail_chain(
            getattr(request, "chain", None), exc, traceback,
            store_result=store_result, state=state,
        )
        if call_errbacks and request.errbacks:
            backend._call_task_errbacks(request, exc, traceback)

    def mark_as_retry(
        self,
        task_id: str,
        exc: BaseException,
        traceback: str | None = None,
        request: Any = None,
        store_result: bool = True,
        state: str = states.RETRY,
    ) -> Any:
        return self.store_result(task_id, exc, state, traceback=traceback, request=request)

    def mark_as_revoked(
        self,
        task_id: str,
        reason: str = "",
        request: Any = None,
        store_result: bool = True,
        state: str = states.REVOKED,
    ) -> None:
        exc = TaskRevokedError(reason)
        if store_result:
            self.store_result(task_id, exc, state, traceback=None, request=request)
        if request and request.chord:
            self.backend.on_chord_part_return(request, state, exc)

    def process_cleanup(self) -> None:
        self.backend.process_cleanup()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} for {self.backend.as_uri()}>"
