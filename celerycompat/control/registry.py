"""The control command registry: how a command is declared and what it sees.

A command is a function ``(state, **arguments) -> reply`` registered under
its Celery name(s) with `command`; `ControlState` is the ``state`` it gets,
with the attributes (``app``, ``hostname``, ``consumer``) that custom
commands registered with ``@inspect_command``/``@control_command`` read from
Celery's own state. The commands themselves are in control/commands.py
(tasks, queues, revokes) and control/worker_commands.py (the worker, its
pool, events, debugging); `handlers_for` in commands.py collects them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    # Commands reach the consumer through its public methods and the
    # interface in consumer/controls.py.
    from celerycompat.consumer.consumer import Consumer

#: name -> handler; aliases are separate entries, as in Celery's Panel.
COMMANDS: dict[str, Callable[..., Any]] = {}


def command(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated handler under ``names`` (default: its own name)."""
    def register(fun: Callable[..., Any]) -> Callable[..., Any]:
        for name in names or (fun.__name__,):
            COMMANDS[name] = fun
        return fun
    return register


def ok(value: Any) -> dict[str, Any]:
    return {"ok": value}


def nok(value: Any) -> dict[str, Any]:
    return {"error": value}


@dataclass
class ControlState:
    """What command handlers see as ``state``."""

    app: Any
    hostname: str
    consumer: Consumer
    started: float = field(default_factory=time.monotonic)
    tset: Callable[[Any], set] = set
