"""The prefork parent/child protocol: framing, messages and Celery's texts.

Pure (no processes, no sockets of its own), so it is unit-tested on its own.

Each child has one ``AF_UNIX`` stream socket pair with the parent. Every
message is one frame: a 4-byte big-endian length, then a pickle of a tuple
whose first item names the message. Both ends are our own code from the same
install, so pickle (of plain data only) is safe here.

Parent -> child::

    ("spawn", SpawnSpec)                       first, to a spawned child only:
                                               what to load (pools/spawned.py)
    ("job", job_no, task_name, TaskMessage)   run this task
    ("stop",)                                  exit cleanly (warm shutdown)

Child -> parent::

    ("up", pid)                                initialised, worker_process_init sent
    ("accepted", job_no)                       the task starts now (time limits start)
    ("done", job_no, Outcome, last, deferred)  finished; ``Outcome.retval`` is dropped,
                                               ``last``: the child exits after this
                                               (max tasks / max memory reached),
                                               ``deferred``: its SUCCESS is still being
                                               written (group commit)
    ("written", job_no, error)                 the deferred write of ``job_no`` is done
                                               (``error`` None) or failed
    ("ack", key)                               a held early ack came due alone: the
                                               consumer may send it (riding_acks.py)
    ("exit", job_no, code)                     the task itself raised SystemExit(code);
                                               the child exits after this

A child that dies without saying ``done`` for an accepted job lost it: the
parent reads that from the socket's end of file and the exit status.

Why the parent sends the parsed ``TaskMessage`` and not the raw body: the
consumer has already decoded and validated it (and must have, to decide
acks), so the child does not decode twice. A ``TaskMessage`` holds what a
serializer produced (JSON/msgpack/YAML types, or objects a pickle body
rebuilt), which pickles back; one that does not (an object whose pickling
fails) is failed by the parent with that error instead of running.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import threading
from typing import Any, Iterator

HEADER = struct.Struct(">I")
MAX_FRAME = 2**31 - 1

#: billiard's exit code for a child that leaves on purpose (max tasks/memory).
EX_RECYCLE = 0x9B
#: billiard's exit code when a terminate signal arrives twice.
EX_SOFTWARE = 70

#: billiard.common.SIGMAP: ``signum -> name`` built from ``dir(signal)`` in
#: order, so an alias sorted later wins (``SIG_SETMASK`` for 2, as billiard
#: shows it), except that SIGHUP and SIGABRT keep their own names.
SIGMAP = {getattr(signal, n): n for n in dir(signal) if n.startswith("SIG")}
for _alias in ("SIGHUP", "SIGABRT"):
    if hasattr(signal, _alias):
        SIGMAP[getattr(signal, _alias)] = _alias


def dumps(message: tuple) -> bytes:
    """One frame for ``message``."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_FRAME:
        raise ValueError(f"message of {len(payload)} bytes is too large for one frame")
    return HEADER.pack(len(payload)) + payload


class FrameReader:
    """Reassembles frames from the bytes a stream socket hands out."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple]:
        """Add ``data``; yield every message now complete, in order."""
        buf = self._buf
        buf += data
        while len(buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(buf)
            end = HEADER.size + size
            if len(buf) < end:
                return
            payload = bytes(buf[HEADER.size:end])
            del buf[:end]
            yield pickle.loads(payload)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)


def recv_message(sock: Any, reader: FrameReader) -> tuple | None:
    """Block until one message arrives on ``sock`` (child side); ``None`` at EOF."""
    while True:
        for message in reader.feed(b""):
            return message
        data = sock.recv(1 << 16)
        if not data:
            return None
        for message in reader.feed(data):
            # Frames after the first stay in the reader for the next call.
            return message


def exitcode_from_status(status: int) -> int:
    """``os.waitpid`` status -> billiard's exitcode (negative: killed by a signal)."""
    return os.waitstatus_to_exitcode(status)


def human_status(exitcode: int | None) -> str:
    """billiard.common.human_status: ``signal 9 (SIGKILL)`` / ``exitcode 3``."""
    if (exitcode or 0) < 0:
        try:
            return f"signal {-exitcode} ({SIGMAP[-exitcode]})"
        except KeyError:
            return f"signal {-exitcode}"
    return f"exitcode {exitcode}"


def worker_lost_text(exitcode: int | None, job: int) -> str:
    """The message of billiard's WorkerLostError for a child that died mid-job."""
    return f"Worker exited prematurely: {human_status(exitcode)} Job: {job}."


def self_exit_text(code: Any) -> str:
    """Celery's text when the task itself raised SystemExit (``Request._worker_lost_info``)."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        code = 1
    return f"Worker exited prematurely: {human_status(code)}."


def time_limits(timelimit: Any, task: Any, default_hard: Any,
                default_soft: Any) -> tuple[Any, Any]:
    """``(hard, soft)`` for one job, with Celery's precedence.

    The message header ``timelimit`` is ``[hard, soft]``; each missing value
    falls back to the task's ``time_limit``/``soft_time_limit``, then to the
    worker's ``--time-limit``/``--soft-time-limit`` (``task_time_limit``...):
    ``Request.execute_using_pool`` then billiard's ``apply_async``.
    """
    hard = soft = None
    if timelimit:
        try:
            hard, soft = timelimit
        except (TypeError, ValueError):
            hard = soft = None
    hard = _seconds(hard) or _seconds(getattr(task, "time_limit", None)) \
        or _seconds(default_hard)
    soft = _seconds(soft) or _seconds(getattr(task, "soft_time_limit", None)) \
        or _seconds(default_soft)
    return hard, soft


def _seconds(value: Any) -> Any:
    """A limit the pools can arm, or None (no limit from this source).

    ``control time_limit`` stores whatever a client sent on the task
    (``soft="abc"``), and settings may be strings: a number or a numeric
    string counts, anything else (junk, NaN, infinite, zero or negative,
    longer than a timer can wait) does not, so junk never stops a task
    from running.
    """
    if isinstance(value, bool) or value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not 0 < seconds <= threading.TIMEOUT_MAX:  # also False for NaN
        return None
    return value if isinstance(value, (int, float)) else seconds
