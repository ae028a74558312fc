"""What the prefork supervisor (prefork_supervisor.py) knows of each job and child.

A `Job` is one task handed to the pool: its message, who runs it, where its
run stands (accepted, its time limits, terminated) and whether its outcome
was reported. A `Child` is one pool process: its socket and frame reader,
the job it runs, and why its exit would not be an error (stopping it,
terminating its job, retiring it at ``pool_restart``). Both are plain
records: only the supervisor thread changes them.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from celerycompat.backends.group_commit import Write
from celerycompat.pools import procproto
from celerycompat.pools.base import OnDone
from celerycompat.protocol.message import TaskMessage


@dataclass(eq=False)
class Job:
    no: int
    task_name: str
    message: TaskMessage
    on_done: OnDone
    payload: bytes
    child: Child | None = None
    accepted: bool = False
    time_start: float | None = None
    hard: Any = None
    soft: Any = None
    handled: bool = False
    """``on_done`` was called (by the child's report or by the parent)."""
    term_signal: int | None = None
    """``revoke(terminate=True)``: the signal for its child (sent at once, or
    when the child accepts the job). No time limit, no lost worker then."""

    @property
    def terminated(self) -> bool:
        return self.term_signal is not None


@dataclass(eq=False)
class Child:
    pid: int
    index: int
    name: str
    sock: socket.socket
    started: float
    reader: procproto.FrameReader = field(default_factory=procproto.FrameReader)
    up: bool = False
    job: Job | None = None
    last: bool = False
    """It said its last job was its last (max tasks / memory): no more jobs."""
    eof: bool = False
    controlled: bool = False
    """We are stopping it: its exit is not an error."""
    stop_sent: bool = False
    signalled: bool = False
    """``terminate`` signalled it: its exit is not an error (until it takes a new job)."""
    retire: bool = False
    """``pool_restart``: it is asked to exit once idle, and replaced."""
    writing: dict[int, tuple[Job, Write]] = field(default_factory=dict)
    """Jobs it reported done whose SUCCESS write it has not confirmed yet."""

    @property
    def idle(self) -> bool:
        return self.up and self.job is None and not (
            self.last or self.eof or self.stop_sent or self.retire)
