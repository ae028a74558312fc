"""Giving held Redis messages back to their queues, as kombu's ``restore_by_tag``.

Why a module of its own: the native Redis broker (redis_broker.py) gives
messages back on four occasions (a requeue, the close, the messages a lost
connection held, a warm shutdown), and every one must do what kombu does,
so that a message looks the same whichever consumer returned it: marked
redelivered, routed again through its exchange's bindings, onto the list
of its priority, and never pushed twice (the tag leaves ``unacked`` in the
same script call that pushes it).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

logger = logging.getLogger("celery.worker.consumer.connection")

#: Give held messages back in one call: for each (tag, queue key, payload)
#: triple, push the payload (ARGV[1] = '1': LPUSH, as kombu's requeue;
#: otherwise RPUSH, as kombu's restore at close) only if this call removed
#: the tag from ``unacked`` (so a message is never pushed twice), and drop
#: the tag from ``unacked_index``. KEYS = unacked, unacked_index.
RESTORE_SCRIPT = """
local push = ARGV[1] == '1' and 'LPUSH' or 'RPUSH'
local removed = {}
for i = 2, #ARGV, 3 do
    local tag = ARGV[i]
    if removed[tag] == nil then
        removed[tag] = redis.call('HDEL', KEYS[1], tag)
        redis.call('ZREM', KEYS[2], tag)
    end
    if removed[tag] == 1 then
        redis.call(push, ARGV[i + 1], ARGV[i + 2])
    end
end
return 0
"""
#: Tags per restore call.
RESTORE_CHUNK = 500


def restore_messages(client: Any, channel: Any, prefix: str, unacked: str,
                     unacked_index: str, script: Any, tags: Sequence[str],
                     leftmost: bool) -> None:
    """Put the messages of ``tags`` back where they were published (LPUSH
    with ``leftmost``, as kombu's requeue; else RPUSH, as its restore at
    close), in chunks of one round trip to read and one to write.

    ``script``: `RESTORE_SCRIPT` registered on ``client``.
    """
    for start in range(0, len(tags), RESTORE_CHUNK):
        chunk = tags[start:start + RESTORE_CHUNK]
        args: list[Any] = ["1" if leftmost else "0"]
        for tag, stored in zip(chunk, client.hmget(unacked, chunk)):
            if stored is None:
                continue  # acked, or restored by someone else already
            try:
                payload, exchange, routing_key = kombu_loads(stored)
                _mark_redelivered(payload)
                priority = channel._get_message_priority(payload, reverse=False)
                for queue in channel._lookup(exchange, routing_key):
                    args += [tag, prefix + channel._q_for_pri(queue, priority),
                             kombu_dumps(payload)]
            except Exception:
                logger.critical("Could not restore message: %.200r", stored, exc_info=True)
        if len(args) > 1:
            script(keys=[unacked, unacked_index], args=args, client=client)


def _mark_redelivered(payload: dict) -> None:
    """What kombu sets on a restored message (``_do_restore_message``)."""
    try:
        payload["headers"]["redelivered"] = True
        payload["properties"]["delivery_info"]["redelivered"] = True
    except (KeyError, TypeError):
        pass
