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
from types import SimpleNamespace
from typing import Any


class RunLocal:
    """Attributes of the current thread's (or greenlet's) run."""

    __slots__ = ("_var",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_var", ContextVar(name))

    def _namespace(self) -> SimpleNamespace:
        try:
            return self._var.get()
        except LookupError:
            namespace = SimpleNamespace()
            self._var.set(namespace)
            return namespace

    def __getattr__(self, name: str) -> Any:
        return getattr(self._namespace(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._namespace(), name, value)
