"""The consumer's body decoder: ``accept_content``, the body size limit, kombu's errors.

Every task body is decoded through the function `make_decoder` returns,
so what a hostile or oversized body does to the worker is decided here,
in one place: refused before decoding (too big), refused as Celery refuses
it (content type not accepted), or an undecodable body (logged and acked by
the consumer), never an exception that ends the worker.
"""

from __future__ import annotations

import os
from typing import Any

from celerycompat.protocol import codecs
from celerycompat.protocol import message as wire

#: ``CCWORKER_MAX_MESSAGE_BYTES`` (or ``ccworker_max_message_bytes`` in the
#: app's configuration) when neither is set: a task body over 64 MiB is
#: rejected before it is decoded. 0 turns the limit off.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def max_message_bytes(conf: Any, environ: Any = os.environ) -> int | None:
    """The body size limit: the environment, else the app's configuration, else 64 MiB.

    A value that is not a whole number of bytes stops the start with a
    clear error rather than running without the protection it asked for.
    """
    raw = environ.get("CCWORKER_MAX_MESSAGE_BYTES")
    where = "CCWORKER_MAX_MESSAGE_BYTES"
    if raw is None or str(raw).strip() == "":
        raw = conf.get("ccworker_max_message_bytes")
        where = "ccworker_max_message_bytes"
    if raw is None:
        return DEFAULT_MAX_MESSAGE_BYTES
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ValueError(f"{where}={raw!r}: expected a number of bytes (0: no limit)") from None
    if value < 0:
        raise ValueError(f"{where}={raw!r}: expected a number of bytes (0: no limit)")
    return value or None


def make_decoder(accept: Any, max_bytes: int | None = None) -> wire.Decoder:
    """The consumer's body decoder: ``accept_content`` enforced, kombu's errors mapped.

    Bodies over ``max_bytes`` are refused undecoded (`wire.limit_body_size`).
    Whatever else a codec raises on hostile bytes (kombu lets some errors
    through unwrapped, e.g. a ``content_encoding`` that is not a string)
    is an undecodable body: logged and acked, never a dead worker.
    """
    accepted = codecs.prepare_accept(accept)

    def decode(body: bytes, content_type: str | None, content_encoding: str | None) -> Any:
        try:
            return codecs.loads(body, content_type, content_encoding, accepted)
        except codecs.ContentDisallowed:
            raise
        except codecs.DecodeError as exc:
            raise wire.BodyUndecodable(exc) from exc
        except Exception as exc:  # noqa: BLE001 - see the docstring
            raise wire.BodyUndecodable(codecs.DecodeError(exc)) from exc

    return wire.limit_body_size(decode, max_bytes)
