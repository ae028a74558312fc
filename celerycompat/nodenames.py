"""Worker node names: Celery's own functions, and the one step ``-n`` adds.

A nodename (``name@host``) is how the rest of a Celery cluster addresses a
worker: the pidbox queue, event ``hostname`` fields, ``worker`` in extended
results and Flower all carry it. Operators write templates such as
``-n w1@%h`` and ``--logfile=/var/log/%n%I.log``; the strings they expand
to must be Celery's (wire contract G1), so the expansion *is* Celery's
(``celery.utils.nodenames``, present in every release ccworker supports).
"""

from __future__ import annotations

from typing import Optional

from celery.utils.nodenames import default_nodename, gethostname, host_format, node_format

__all__ = ["default_nodename", "expand_nodename", "host_format", "local_hostname",
           "node_format"]


def local_hostname() -> str:
    """This machine's host name as Celery reads it (once per process)."""
    return gethostname()


def expand_nodename(value: Optional[str]) -> str:
    """The worker nodename for ``-n value``, as ``celery worker``'s
    ``Hostname`` parameter type converts it: defaulted (``celery@<host>``),
    then host-formatted. ``ValueError`` for an unknown ``%x``."""
    return host_format(default_nodename(value))
