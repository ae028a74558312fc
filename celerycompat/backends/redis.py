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

import functools
import time
from typing import Any

from celery import states
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import NoScriptError, WatchError

from ..protocol import codecs
from . import group_commit, riding_acks
from .base import NativeStore, ignores_result

__all__ = ("RedisResultStore", "STORE_RESULT_LUA", "STORE_AND_ACK_LUA")

#: The SUCCESS-sticky write, as a Lua function: ``store(key, payload, ttl)``
#: returns 1 written, 0 skipped (stored state is SUCCESS), -1 undecided (the
#: stored value isn't Celery JSON, e.g. compressed by another worker): the
#: caller then decodes it in Python and writes with WATCH/MULTI.
#: A Celery JSON meta always starts with the status field, so the state can be
#: read from the prefix without decoding a possibly large document.
_STORE_FUNCTION = """
local function store(key, payload, ttl)
    local current = redis.call('GET', key)
    if current then
        local head = '{"status": "'
        if string.sub(current, 1, #head) ~= head then
            return -1
        end
        if string.sub(current, #head + 1, #head + 8) == 'SUCCESS"' then
            return 0
        end
    end
    ttl = tonumber(ttl)
    if ttl > 0 then
        redis.call('SETEX', key, ttl, payload)
    else
        redis.call('SET', key, payload)
    end
    redis.call('PUBLISH', key, payload)
    return 1
end
"""

#: KEYS[1] = task meta key; ARGV[1] = payload; ARGV[2] = TTL seconds (0 = none).
STORE_RESULT_LUA = _STORE_FUNCTION + "return store(KEYS[1], ARGV[1], ARGV[2])\n"

#: The write and the message's ack in one atomic call (riding_acks.py).
#: KEYS = meta key ('' for the ack alone), kombu's unacked, unacked_index;
#: ARGV = payload, TTL, the broker's database, the delivery tag. Undecided
#: (-1): nothing done, the caller writes and then acks. The ``SELECT`` holds
#: for this script only; the connection keeps its database.
STORE_AND_ACK_LUA = _STORE_FUNCTION + """
local written = 1
if KEYS[1] ~= '' then
    written = store(KEYS[1], ARGV[1], ARGV[2])
    if written == -1 then
        return -1
    end
end
redis.call('SELECT', ARGV[3])
redis.call('HDEL', KEYS[2], ARGV[4])
redis.call('ZREM', KEYS[3], ARGV[4])
return written
"""

#: How long an early ack waits in the writer for its task's SUCCESS to join
#: it (seconds). Long enough for a short task's run (a no-op runs in a few
#: hundred microseconds), short because a worker killed meanwhile leaves the
#: message un-acked, to run again: Celery acks at once.
EARLY_ACK_DELAY = 0.002

#: Redis' maximum string value (Celery refuses larger payloads up front).
MAX_VALUE_SIZE = 536870912

WRITTEN, SKIPPED, UNDECIDED = 1, 0, -1


class WriteItem(group_commit.Amendable):
    """One write for the writer thread: a meta (``key`` None: none) and the
    message ack riding with it (``ticket``, riding_acks.py), or either."""

    __slots__ = ("key", "payload", "expires", "ticket")

    def __init__(self, key: bytes | None, payload: bytes | None, expires: int,
                 ticket: riding_acks.AckTicket | None = None,
                 not_before: float = 0.0) -> None:
        self.not_before = not_before
        self.key = key
        self.payload = payload
        self.expires = expires
        self.ticket = ticket


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
        self._ack_script = self.client.register_script(STORE_AND_ACK_LUA)
        self._writer: group_commit.GroupWriter | None = None
        self._server = riding_acks.server_of(self.client)

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
        # On -P asyncio's loop (STARTED, RETRY, FAILURE...) through the writer,
        # so only this run waits for Redis, not every coroutine of the loop.
        group_commit.write_through(
            self._group_writer, WriteItem(key, payload, expires),
            functools.partial(self.backend.ensure, self._write, (key, payload, expires)))

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

    #: SUCCESS writes may be deferred (group commit), so an early ack must
    #: not land before one: the consumer hands such runs a notice ticket.
    defers_success = True

    def carries_acks_from(self, server: tuple | None) -> bool:
        """Whether acks of a broker on ``server`` can ride with our writes."""
        return server is not None and server == self._server

    def ride(self, ticket: riding_acks.AckTicket) -> None:
        """Take the current run's ack (riding_acks.py); an early ack is
        held now and waits `EARLY_ACK_DELAY` for the SUCCESS to join it."""
        if ticket.server is None:
            if not ticket.early:
                return  # the consumer acks after the write anyway
        elif not self.carries_acks_from(ticket.server):
            return
        ride = riding_acks.Ride(ticket)
        if ticket.early:
            ride.item = WriteItem(None, None, 0, ticket,
                                  not_before=time.monotonic() + EARLY_ACK_DELAY)
            ride.write = self._group_writer().hold(ride.item)
        riding_acks.begin(ride)

    def mark_as_done(
        self,
        task_id: str,
        result: Any,
        request: Any = None,
        store_result: bool = True,
        state: str = states.SUCCESS,
    ) -> None:
        """SUCCESS of a plain task: deferred to the writer thread when enabled."""
        ride = riding_acks.current()
        if not (group_commit.enabled() and store_result and state == states.SUCCESS
                and not (request is not None and request.chord)):
            return super().mark_as_done(task_id, result, request, store_result, state)
        if ignores_result(request):
            return None
        encoded = self.encoder.encode_result(result, state)
        key, payload, expires = self._prepare(task_id, encoded, state, None, request)
        writer = self._group_writer()
        if ride is None:
            group_commit.add_pending(writer.submit(WriteItem(key, payload, expires)))
        elif not ride.ticket.early:
            # acks_late: the ack goes in the same call as the SUCCESS.
            group_commit.add_pending(writer.submit(WriteItem(key, payload, expires,
                                                             ride.ticket)))
        elif writer.amend(ride.item, lambda item: _join(item, key, payload, expires)):
            group_commit.add_pending(ride.write)  # early ack not out yet: joined it
        else:
            # The early ack is out: an acked message must not wait for a
            # deferred result (a kill would lose it), so write it now.
            return group_commit.write_through(
                self._group_writer, WriteItem(key, payload, expires),
                functools.partial(super().mark_as_done, task_id, result, request,
                                  store_result, state))
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

    def _write_many(self, items: list[WriteItem]) -> list[BaseException | None]:
        """One pipeline for the batch (Celery's retry policy around it); a
        write the script cannot decide is redone alone, as `_write` does,
        and its ack then sent after it. A notice ticket's ack is not ours:
        alone, it is announced (`riding_acks.ack_due`); with a SUCCESS, the
        SUCCESS is written and the consumer acks once it has landed."""
        errors: list[BaseException | None] = [None] * len(items)
        writes = []
        for index, item in enumerate(items):
            ticket = item.ticket
            if ticket is not None and ticket.server is None:
                item.ticket = None
                if item.key is None:
                    riding_acks.ack_due(ticket.tag)
            if item.key is not None or item.ticket is not None:
                writes.append(index)
        if not writes:
            return errors
        replies = self.backend.ensure(self._pipeline_writes, ([items[i] for i in writes],))
        for index, reply in zip(writes, replies):
            item = items[index]
            try:
                if isinstance(reply, NoScriptError):
                    # Redis lost its script cache (a restart, SCRIPT FLUSH):
                    # the one-off path loads the script again.
                    self.backend.ensure(self._write_alone, (item,))
                elif isinstance(reply, BaseException):
                    raise reply
                elif reply == UNDECIDED:
                    if item.key is not None:
                        self.backend.ensure(self._write_watched,
                                            (item.key, item.payload, item.expires))
                    if item.ticket is not None:
                        self.backend.ensure(self._ack_alone, (item.ticket,))
            except Exception as exc:
                errors[index] = exc
        return errors

    def _pipeline_writes(self, items: list[WriteItem]) -> list[Any]:
        if not self.lua_decides:
            return [UNDECIDED] * len(items)
        # EVALSHA by hand: a redis-py ``Script`` in a pipeline costs a SCRIPT
        # EXISTS round trip before every batch; a missing script comes back
        # as NoScriptError for the items it hit, which ``_write_many`` redoes.
        pipe = self.client.pipeline(transaction=False)
        sha, ack_sha = self._script.sha, self._ack_script.sha
        for item in items:
            ticket = item.ticket
            if ticket is None:
                pipe.evalsha(sha, 1, item.key, item.payload, item.expires)
            else:
                pipe.evalsha(ack_sha, 3, item.key or b"", ticket.unacked,
                             ticket.unacked_index, item.payload or b"", item.expires,
                             ticket.db, ticket.tag)
        return pipe.execute(raise_on_error=False)

    def _write_alone(self, item: WriteItem) -> None:
        if item.ticket is None:
            self._write(item.key, item.payload, item.expires)
            return
        if self._ack_script(keys=[item.key or b"", item.ticket.unacked,
                                  item.ticket.unacked_index],
                            args=[item.payload or b"", item.expires, item.ticket.db,
                                  item.ticket.tag]) == UNDECIDED:
            self._write_watched(item.key, item.payload, item.expires)
            self._ack_alone(item.ticket)

    def _ack_alone(self, ticket: riding_acks.AckTicket) -> None:
        self._ack_script(keys=[b"", ticket.unacked, ticket.unacked_index],
                         args=[b"", 0, ticket.db, ticket.tag])

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


def _join(item: WriteItem, key: bytes, payload: bytes, expires: int) -> None:
    """A SUCCESS joins the early ack still waiting in the writer."""
    item.key, item.payload, item.expires = key, payload, expires
