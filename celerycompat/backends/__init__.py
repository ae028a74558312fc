"""Where results go: native Redis, native RPC, or the app's own backend.

``result_store_for(app)`` picks the fastest store that is *provably* the
same as Celery's: a native store only when the backend is Celery's own
Redis/RPC class, or a subclass that leaves every method on the storing path
alone. A subclass that customizes storage gets the adapter, which runs its
code exactly as ``celery worker`` would.
"""

from __future__ import annotations

from typing import Any

from celerycompat.celery_release import rpc_replies_carry_meta

from .app_backend import AppBackendStore
from .base import NativeStore, ResultStore

__all__ = ("ResultStore", "NativeStore", "AppBackendStore", "result_store_for")

#: Methods Celery's backends call while building and storing a state. If a
#: subclass overrides any of them the stored outcome may differ from ours.
_COMMON_STORE_PATH = (
    "store_result", "_get_result_meta", "current_task_children", "encode", "_encode",
    "encode_result", "prepare_exception", "prepare_value",
    "mark_as_started", "mark_as_done", "mark_as_failure", "mark_as_retry", "mark_as_revoked",
)
_REDIS_STORE_PATH = _COMMON_STORE_PATH + (
    "_store_result", "_set_with_state", "set", "_set", "get_key_for_task", "_get_key_for",
    "_get_task_meta_for", "get",
)
_RPC_STORE_PATH = _COMMON_STORE_PATH + ("_to_result", "destination_for")


def _keeps_methods(backend: Any, base: type, names: tuple[str, ...]) -> bool:
    cls = type(backend)
    return isinstance(backend, base) and all(
        getattr(cls, name, None) is getattr(base, name, None) for name in names
    )


def result_store_for(app: Any, backend: Any = None) -> ResultStore:
    """The result store for ``backend`` (default: ``app.backend``).

    Pass ``backend`` for a task that sets its own ``Task.backend``; such a
    task must store where Celery would store it.
    """
    backend = app.backend if backend is None else backend
    try:
        from celery.backends.redis import RedisBackend
    except ImportError:  # redis-py missing: no Redis backend to speak of
        RedisBackend = None  # noqa: N806
    from celery.backends.rpc import RPCBackend

    if RedisBackend is not None and _keeps_methods(backend, RedisBackend, _REDIS_STORE_PATH):
        from .redis import RedisResultStore

        return RedisResultStore(app, backend)
    if rpc_replies_carry_meta() and _keeps_methods(backend, RPCBackend, _RPC_STORE_PATH):
        from .rpc import RPCResultStore

        return RPCResultStore(app, backend)
    return AppBackendStore(app, backend)
