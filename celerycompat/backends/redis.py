"""Native result writes for Celery's Redis backend (``redis://``, ``rediss://``,
``sentinel://``) - contract B3, C9-C11.

Celery stores a state with two round trips: ``GET`` the current meta (a
stored SUCCESS is never overwritten, B3) then ``MULTI SETEX/SET + PUBLISH +
EXEC``. The check and the write are not atomic, so a late FAILURE can still
race a SUCCESS. We do both in one Lua script: one round trip, and atomic.

The connection is the one the app's backend already configured
(``backend.client``: URL, TLS, sentinel, pool size, credentials), and key
names, TTLs and retry policy come from that same object, so nothing here can
disagree with how a Celery client reads the result.
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import NoScriptError, WatchError

from ..protocol import codecs
from . import group_commit
from .base import NativeStore, ignores_result

__all__ = ("RedisResultStore", "STORE_RESULT_LUA")

#: KEYS[1] = task meta key; ARGV[1] = payload; ARGV[2] = TTL seconds (0 = none).
#: Returns 1 written, 0 skipped (stored state is SUCCESS), -1 undecided (the
#: stored value isn't Celery JSON, e.g. compressed by another worker): the
#: caller then decodes it in Python and writes with WATCH/MULTI.
#: A Celery JSON meta always starts with the status field, so the state can be
#: read from the prefix without decoding a possibly large document.
STORE_RESULT_LUA = """
local current = redis.call('GET', KEYS[1])
if current then
    local head = '{"status": "'
    if string.sub(current, 1, #head) ~= head then
        return -1
    end
    if string.sub(current, #head + 1, #head + 8) == 'SUCCESS"' then
        return 0
    end
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
    redis.call('SETEX', KEYS[1], ttl, ARGV[1])
else
    redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""

#: Redis' maximum string value (Celery refuses larger payloads up front).
MAX_VALUE_SIZE = 536870912

WRITTEN, SKIPPED, UNDECIDED = 1, 0, -1


class RedisResultStore(NativeStore):
    """One-round-trip, SUCCESS-sticky meta writes on the app's Redis client.

    Thread-safe: redis-py clients draw a connection from their pool per
    command, the Lua ``Script`` object only caches its SHA, and the rest is
    read-only after construction.
    """

    def __init__(self, app: Any, backend: Any) -> None:
        super().__init__(app, backend)
        self.client = backend.client
        # Celery < 5.3 has no result compression (nor the attribute).
        self.compression = getattr(backend, "compression", None)
        self.expires = backend.expires
        # Celery 5.7: FAILURE may expire on its own schedule; older versions
        # lack the attribute and use result_expires for everything.
        self.failure_expires = getattr(backend, "failure_expires", backend.expires)
        # Prefix matching in Lua only understands uncompressed JSON.
        self.lua_decides = self.encoder.serializer == "json" and not self.compression
        self._script = self.client.register_script(STORE_RESULT_LUA)
        self._writer: group_commit.GroupWriter | None = None

    def encode_meta(self, meta: dict) -> bytes:
        """Serialize (and compress, C11) a meta document as Celery's ``encode``."""
        payload = self.encoder.encode(meta)
        if self.compression:
            payload = codecs.compress_result_payload(payload, self.compression)
        return payload

    def _store(
        self, task_id: str, result: Any, state: str, traceback: str | None, request: Any
    ) -> None:
        key, payload, expires = self._prepare(task_id, result, state, traceback, request)
        # backend.ensure = Celery's reconnect-and-retry policy for Redis errors.
        self.backend.ensure(self._write, (key, payload, expires))

    def _prepare(
        self, task_id: str, result: Any, state: str, traceback: str | None, request: Any
    ) -> tuple[bytes, bytes, int]:
        """The key, encoded meta and TTL of one write; refuses what Redis cannot hold."""
        meta = self.encoder.meta(bytes_to_str(task_id), result, state, traceback, request)
        payload = self.encode_meta(meta)
        if len(payload) > MAX_VALUE_SIZE:
            # Celery checks str length before sending (bytes payloads reach
            # Redis and fail there); we check the bytes, for every serializer.
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        key = self.backend.get_key_for_task(task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        return key, payload, expires or 0

    # -- group commit (backends/group_commit.py) ------------------------------

    def mark_as_done(
        self,
        task_id: str,
        result: Any,
        request: Any = None,
        store_result: bool = True,
        state: str = states.SUCCESS,
    ) -> None:
        """SUCCESS of a plain task: deferred to the writer thread when enabled."""
        if not (group_commit.enabled() and store_result and state == states.SUCCESS
                and not (request is not None and request.chord)):
            return super().mark_as_done(task_id, result, request, store_result, state)
        if ignores_result(request):
            return None
        encoded = self.encoder.encode_result(result, state)
        item = self._prepare(task_id, encoded, state, None, request)
        group_commit.add_pending(self._group_writer().submit(item))
        return None

    def _group_writer(self) -> group_commit.GroupWriter:
        if self._writer is None:
            self._writer = group_commit.shared_writer(self._identity(), self._write_many)
        return self._writer

    def _identity(self) -> tuple:
        """Equal for the per-thread copies of one configured backend.

        Same class and same connection parameters give an equivalent client;
        ``lua_decides`` decides how a batch is sent. A parameter whose repr
        differs per copy (a credential provider object, say) only costs a
        writer of its own.
        """
        params = getattr(self.backend, "connparams", None) or {}
        return ("redis", type(self.backend), getattr(self.backend, "url", None),
                repr(sorted(params.items(), key=lambda kv: kv[0])), self.lua_decides)

    def _write_many(self, items: list[tuple[bytes, bytes, int]]) -> list[BaseException | None]:
        """One pipeline for the batch (Celery's retry policy around it); a
        write the script cannot decide is redone alone, as `_write` does."""
        replies = self.backend.ensure(self._pipeline_writes, (items,))
        errors: list[BaseException | None] = []
        for (key, payload, expires), reply in zip(items, replies):
            try:
                if isinstance(reply, NoScriptError):
                    # Redis lost its script cache (a restart, SCRIPT FLUSH):
                    # the one-off path loads the script again.
                    self.backend.ensure(self._write, (key, payload, expires))
                elif isinstance(reply, BaseException):
                    raise reply
                elif reply == UNDECIDED:
                    self.backend.ensure(self._write_watched, (key, payload, expires))
                errors.append(None)
            except Exception as exc:
                errors.append(exc)
        return errors

    def _pipeline_writes(self, items: list[tuple[bytes, bytes, int]]) -> list[Any]:
        if not self.lua_decides:
            return [UNDECIDED] * len(items)
        # EVALSHA by hand: a redis-py ``Script`` in a pipeline costs a SCRIPT
        # EXISTS round trip before every batch; a missing script comes back
        # as NoScriptError for the items it hit, which ``_write_many`` redoes.
        pipe = self.client.pipeline(transaction=False)
        sha = self._script.sha
        for key, payload, expires in items:
            pipe.evalsha(sha, 1, key, payload, expires)
        return pipe.execute(raise_on_error=False)

    def _write(self, key: bytes, payload: bytes, expires: int) -> None:
        if self.lua_decides:
            if self._script(keys=[key], args=[payload, expires]) != UNDECIDED:
                return
        self._write_watched(key, payload, expires)

    def _write_watched(self, key: bytes, payload: bytes, expires: int) -> None:
        """GET + decode with Celery's reader, then MULTI write unless SUCCESS.

        WATCH makes it atomic (Celery's own check is not); a concurrent
        writer just makes us look again.
        """
        with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    current = pipe.get(key)
                    if current and self._is_success(current):
                        pipe.unwatch()
                        return
                    pipe.multi()
                    if expires:
                        # SETEX like Celery (redis-py deprecates the helper)
                        pipe.execute_command("SETEX", key, expires, payload)
                    else:
                        pipe.set(key, payload)
                    pipe.publish(key, payload)
                    pipe.execute()
                    return
                except WatchError:
                    continue

    def _is_success(self, stored: bytes) -> bool:
        # The backend's decode handles the in-band compression marker and the
        # result accept list, exactly as Celery's pre-write GET does.
        meta = self.backend.decode(stored)
        return meta["status"] == states.SUCCESS
