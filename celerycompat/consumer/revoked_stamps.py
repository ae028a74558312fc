"""Tasks revoked by stamp (``revoke_by_stamped_headers``): what is revoked, what it stops.

Celery's canvas stamping (5.3+) puts stamps in a task message's headers:
``stamped_headers`` names them and ``stamps`` maps each name to a value or
a list of values (`celerycompat.protocol.message.TaskMessage.stamps`). The
``revoke_by_stamped_headers`` command revokes every task carrying one of the
given values, as ``revoke`` does by id.

Semantics are Celery 5.7's (``worker_state.revoked_stamps`` and
``Request.revoked``):

* revoked values accumulate per stamp name, in the order received, and are
  never forgotten while the worker runs; they are neither saved by
  ``--statedb`` nor exchanged by mingle (Celery does neither);
* a message matches when one of its stamped headers has a value (or, for a
  list, any element) among the revoked values of that name; the first
  match, in the order of ``stamped_headers``, is the one the "Discarding
  revoked task" log line names;
* a running task matches a command (``terminate``) when its values and the
  command's values for a name intersect.

Pure: no I/O, no consumer; the consumer and the control command share one
`RevokedStamps`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from kombu.utils.functional import maybe_list


class RevokedStamps:
    """The revoked stamp values, by stamp name."""

    def __init__(self) -> None:
        self._values: dict[str, list[Any]] = {}

    def add(self, headers: Mapping[str, Any]) -> None:
        """Revoke ``{name: value or values}``; values add to those revoked before.

        A value of None is an error (TypeError), as in Celery.
        """
        for name, values in headers.items():
            self._values[name] = [*self._values.get(name, ()), *list(maybe_list(values))]

    def match(self, stamped_headers: Iterable[str],
              stamps: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        """``{name: value}`` of the first revoked stamp a message carries, else None."""
        if not self._values:
            return None
        for name in stamped_headers:
            revoked = self._values.get(name)
            value = stamps.get(name)
            if revoked is None or value is None:
                continue
            if isinstance(value, (list, tuple)):
                for item in value:
                    if item in revoked:
                        return {name: item}
            elif value in revoked:
                return {name: value}
        return None

    def as_dict(self) -> dict[str, list[Any]]:
        return {name: list(values) for name, values in self._values.items()}

    def __bool__(self) -> bool:
        return bool(self._values)


def parse_cli_headers(headers: Any) -> Any:
    """``celery control revoke_by_stamped_headers k=v ...`` sends a list of strings.

    Turned into ``{k: v}`` as Celery does: a later ``k`` wins, the value is
    the text between the first and the second ``=``, and an item without
    ``=`` is an error (IndexError) that reaches the client as the reply.
    Anything else (a mapping from ``app.control``) is returned unchanged.
    """
    if not isinstance(headers, list):
        return headers
    parsed = {}
    for item in headers:
        parts = item.split("=")
        parsed[parts[0]] = parts[1]
    return parsed


def intersecting(stamps: Mapping[str, Any],
                 headers: Mapping[str, Any]) -> dict[str, set[Any]]:
    """The values of ``headers`` a task's ``stamps`` also has, by name (for ``terminate``)."""
    found: dict[str, set[Any]] = {}
    for name, wanted in headers.items():
        value = stamps.get(name)
        if value is None:
            continue
        common = set(maybe_list(value)) & set(maybe_list(wanted))
        if common:
            found.setdefault(name, set()).update(common)
    return found
