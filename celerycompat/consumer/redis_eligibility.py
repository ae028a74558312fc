"""Which deployments the native Redis path (redis_broker.py) serves.

The path keeps kombu's key layout and guarantees only where kombu's Redis
transport keeps them the way it reads them: acks emulated (``unacked``
state to match), no expiring queue (kombu refreshes those TTLs on each
read), and a kombu whose Redis channel has every attribute the path reads.
Anything else runs on kombu's own transport, as ``celery worker`` does;
a kombu that lacks an attribute says so in one WARNING line.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

from kombu import Connection

logger = logging.getLogger("celery.worker.consumer.connection")

#: What the native path reads of kombu's Redis ``Channel`` (key names, the
#: priority layout, the restore schedule): all of it, or the path is off.
CHANNEL_NEEDS = (
    "_get_message_priority", "_lookup", "_q_for_pri", "global_keyprefix",
    "priority_steps", "qos", "sep", "unacked_index_key", "unacked_key",
    "unacked_restore_interval", "unacked_restore_limit", "unacked_restore_throttle",
    "visibility_timeout",
)


def missing_channel_attributes() -> list[str]:
    """What the installed kombu's Redis channel lacks of `CHANNEL_NEEDS`
    (kombu 5.2 has no restore throttle, for one)."""
    from kombu.transport.redis import Channel

    return [name for name in CHANNEL_NEEDS if not hasattr(Channel, name)]


_warned_missing = False


def _channel_supported() -> bool:
    global _warned_missing
    missing = missing_channel_attributes()
    if missing and not _warned_missing:
        import kombu

        _warned_missing = True
        logger.warning(
            "Redis fast path off: kombu %s's Redis channel lacks %s; tasks are "
            "fetched through kombu's own Redis transport, as celery worker does",
            kombu.__version__, ", ".join(missing))
    return not missing


def native_path_eligible(connection: Connection, queues: Sequence[Any]) -> bool:
    """Whether the native path keeps every kombu guarantee for these queues.

    It does not when acks are not emulated (``ack_emulation=False``: kombu
    keeps no ``unacked`` state to match), a queue expires (``x-expires``:
    kombu refreshes the list and binding TTLs on each read, which this path
    does not do) or the installed kombu lacks what the path reads of its
    channel (one WARNING says so).
    """
    if connection.transport.driver_type != "redis" or not _channel_supported():
        return False
    options = connection.transport_options or {}
    if not options.get("ack_emulation", True):
        return False
    return not any(expires(queue) for queue in queues)


def expires(queue: Any) -> bool:
    """Whether ``queue`` expires (``x-expires``), which the native path does not refresh."""
    arguments = getattr(queue, "queue_arguments", None) or {}
    return bool(getattr(queue, "expires", None) or arguments.get("x-expires"))
