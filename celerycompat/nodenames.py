"""Worker node names and the ``%x`` expansions Celery applies to them.

A nodename (``name@host``) is how the rest of a Celery cluster addresses a
worker: the pidbox queue, event ``hostname`` fields, ``worker`` in extended
results and Flower all carry it. Operators write templates such as
``-n w1@%h`` and ``--logfile=/var/log/%n%I.log``, so a drop-in has to expand
them to the very same strings Celery does (wire contract G1).

Two expansions exist:

* :func:`host_format` for ``-n/--hostname``: ``%h`` full host, ``%n`` the host
  up to its first dot, ``%d`` the rest after that dot.
* :func:`node_format` for ``--logfile``/``--pidfile``/``--statedb``: the same
  keys, but ``%n`` is the *name* half of the nodename and ``%p`` the whole
  nodename.

Both know ``%i`` (pool process index, ``0`` in the main process) and ``%I``
(the same with a leading ``-``, empty in the main process) and ``%%``. Any
other ``%`` followed by a word character is an error, as in Celery; a ``%``
followed by anything else (or nothing) is kept as it is.

Everything here is a pure function of its arguments except the defaults for
the local host name and the process index, which are read from the running
process exactly where Celery reads them.
"""

from __future__ import annotations

import re
import socket
from functools import lru_cache
from typing import Callable, Mapping, Optional, Union

NODENAME_SEP = "@"
DEFAULT_NAME = "celery"

# ``%`` followed by one word character (Unicode letters, digits, ``_``) or by a
# second ``%``. Celery uses the same token definition, so ``%-`` or a trailing
# ``%`` survive untouched while ``%x`` with an unknown ``x`` is rejected.
_TOKEN = re.compile(r"%([%\w])")

Resolver = Union[str, Callable[[], str]]


@lru_cache(maxsize=1)
def local_hostname() -> str:
    """The host name of this machine, looked up once per process.

    Celery memoizes ``socket.gethostname()`` for the life of the process, so
    a host renamed while the worker runs keeps its old nodename; we match.
    """
    return socket.gethostname()


def split_nodename(nodename: str) -> tuple[Optional[str], str]:
    """Split ``name@host`` at the first ``@``; no ``@`` means *host only*.

    ``"w1@a.b"`` -> ``("w1", "a.b")``; ``"a.b"`` -> ``(None, "a.b")``.
    A second ``@`` belongs to the host part, as in Celery.
    """
    name, sep, host = nodename.partition(NODENAME_SEP)
    if not sep:
        return None, nodename
    return name, host


def default_nodename(value: Optional[str], default_name: str = DEFAULT_NAME,
                     hostname: Optional[str] = None) -> str:
    """Complete ``-n`` into a full ``name@host`` (before any ``%`` expansion).

    A missing name becomes ``celery`` and a missing host the local host name,
    so ``None``/``""`` -> ``celery@<host>``, ``"w1@"`` -> ``w1@<host>`` and
    ``"%h"`` -> ``celery@%h`` (expanded later by :func:`host_format`).
    """
    name, host = split_nodename(value or "")
    return f"{name or default_name}{NODENAME_SEP}{host or hostname or local_hostname()}"


def current_process_index() -> Optional[int]:
    """The 1-based index of this pool process, ``None`` in the main process.

    Celery's prefork children carry a 0-based ``index`` on billiard's process
    object; everything else (main process, threads, greenlets) has none.
    """
    try:
        from billiard.process import current_process
    except ImportError:  # billiard comes with Celery; without it we are "main"
        return None
    index = getattr(current_process(), "index", None)
    return None if index is None else index + 1


def _index_resolvers(process_index: Optional[int]) -> dict[str, Resolver]:
    """``%i``/``%I`` resolvers; read the process index lazily, only if used."""

    def index() -> Optional[int]:
        return current_process_index() if process_index is None else process_index

    def plain() -> str:
        value = index()
        return str(value) if value else "0"

    def dashed() -> str:
        value = index()
        return f"-{value}" if value else ""

    return {"i": plain, "I": dashed}


def expand(template: Optional[str], keys: Mapping[str, Resolver]) -> Optional[str]:
    """Replace every ``%x`` in ``template`` by ``keys[x]`` (called if callable).

    ``%%`` is always a literal ``%``. Falsy templates are returned as they
    are, so ``None`` stays ``None`` (an unset ``--logfile`` remains unset).

    Raises:
        ValueError: for ``%x`` when ``x`` is a word character not in ``keys``.
    """
    if not template:
        return template
    table = dict(keys)
    table.setdefault("%", "%")

    def substitute(match: re.Match) -> str:
        key = match.group(1)
        if key not in table:
            raise ValueError(f"Unknown format %{key} in string {template!r}.")
        value = table[key]
        return value() if callable(value) else value

    return _TOKEN.sub(substitute, template)


def host_format(template: Optional[str], host: Optional[str] = None,
                name: Optional[str] = None, process_index: Optional[int] = None,
                **extra: Resolver) -> Optional[str]:
    """Expand ``%h %n %d %i %I %%`` (plus ``extra`` keys) in ``template``.

    ``host`` defaults to the local host name; ``name`` (``%n``) defaults to
    the host up to its first dot. ``process_index`` overrides the index read
    from the running process (1-based; ``None``/``0`` means main process).
    """
    host = host or local_hostname()
    short, _, domain = host.partition(".")
    keys: dict[str, Resolver] = {"h": host, "n": name or short, "d": domain}
    keys.update(_index_resolvers(process_index))
    keys.update(extra)
    return expand(template, keys)


def expand_nodename(value: Optional[str], hostname: Optional[str] = None) -> str:
    """The worker nodename for ``-n value``: defaulted, then host-formatted.

    This is what ``celery worker -n`` ends up with: ``None`` ->
    ``celery@<host>``, ``"w1@%h"`` -> ``w1@<host>``, ``"%n.x"`` ->
    ``celery@<short host>.x``.
    """
    result = host_format(default_nodename(value, hostname=hostname), host=hostname)
    assert result is not None  # default_nodename never returns ""
    return result


def node_format(template: Optional[str], nodename: str,
                process_index: Optional[int] = None) -> Optional[str]:
    """Expand a ``--logfile``/``--pidfile``/``--statedb`` path for ``nodename``.

    Here ``%n`` is the name half of the nodename (``celery`` when it has
    none), ``%h``/``%d`` come from its host half and ``%p`` is the whole
    nodename, so ``/run/%n.pid`` gives one file per worker on a host.
    """
    name, host = split_nodename(nodename)
    return host_format(template, host, name or DEFAULT_NAME,
                       process_index=process_index, p=nodename)
