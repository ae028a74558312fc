"""State private to the task run in progress, wherever runs interleave.

A run's own state (its deferred result writes, its riding ack) used to live
in ``threading.local``: one run at a time per thread, or per greenlet once
gevent or eventlet patched ``threading``. The asyncio pool runs many tasks
in greenlets of one unpatched thread, switching at their awaits, so a
thread-local would be shared by all of them.

`RunLocal` keeps its attributes in a ``contextvars`` context instead: each
thread starts with its own, and greenlet gives each greenlet its own, so it
is per thread for the threads, solo and prefork pools, and per greenlet for
the green and asyncio pools.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any


class RunLocal:
    """Values of the current thread's (or greenlet's) run, by name.

    ``get``/``set`` rather than attributes: a ``__getattr__`` costs about a
    microsecond per read, and a task's run reads these several times on the
    hottest path of every pool (a dict in a ``ContextVar`` is a tenth of it).
    """

    __slots__ = ("_var",)

    def __init__(self, name: str) -> None:
        self._var: ContextVar[dict[str, Any]] = ContextVar(name)

    def get(self, name: str, default: Any = None) -> Any:
        values = self._var.get(None)
        return default if values is None else values.get(name, default)

    def set(self, name: str, value: Any) -> None:
        values = self._var.get(None)
        if values is None:
            values = {}
            self._var.set(values)
        values[name] = value
