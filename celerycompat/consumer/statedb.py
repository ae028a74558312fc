"""``--statedb``: the revoked task ids and the logical clock kept across restarts.

The file is the one ``celery worker --statedb`` keeps
(``celery.worker.state.Persistent``), read and written the same way, so a
worker moved from ``celery worker --statedb=x`` to ``ccworker --statedb=x``
keeps the ids revoked before the move, and the other way round:

* a :mod:`shelve` file: Python's :mod:`dbm` chooses the files (``x`` with
  gdbm, ``x.db`` with ndbm, ``x.dat``/``x.dir``/``x.bak`` with the dumb
  fallback), so both workers must run on a Python with the same ``dbm``
  modules, as two Celery versions must;
* ``zrevoked``: the revoked set (a Celery ``LimitedSet``), pickled with
  kombu's ``pickle_protocol`` and zlib-compressed. Files of Celery < 3.1
  have ``revoked`` instead (a ``LimitedSet``, or a plain dict before
  3.0.18): it is read and then dropped, so the next save leaves the
  current layout;
* ``clock``: the Lamport clock at the last save; ``__proto__``: ``3``.

What is loaded are the ids only: they are stamped with this process's
monotonic clock, as Celery's ``merge_revoked`` does, because the saved
stamps may come from before a reboot and would not be comparable (an id
then lives ``CELERY_WORKER_REVOKE_EXPIRES`` from the restart, not from its
revocation). Expired ids are purged after the merge and before a save. The
clock moves past the saved value (``adjust``), and the value it reaches is
written back at once, as Celery does.

**The file must be trusted.** It holds pickles, exactly like Celery's, and
loading a pickle can run any code it names. It is the worker's own local
state, not input from the wire: keep it where only the worker's user can
write, as for Celery's.

When it is read and written is the worker's business (``worker.py``): read
before the consumer connects, so mingle's ``hello`` already carries the
loaded ids, and written once at shutdown, Celery's ``atexit`` moment.
Celery does not save periodically, and neither does ccworker: a worker
killed with SIGKILL keeps the previous save. Nothing here knows the
consumer; it works on any ``LimitedSet`` and ``LamportClock``.
"""

from __future__ import annotations

import pickle
import shelve
import zlib
from typing import Any, Optional

from kombu.serialization import pickle_protocol

#: Celery's layout version, written as ``__proto__`` (not read by Celery).
LAYOUT_VERSION = 3


class StateDB:
    """One ``--statedb`` file, open from `load` until `save`.

    Celery keeps the shelf open for the worker's whole run; so does this
    class, which with gdbm (which locks its file) makes a second worker
    pointed at the same file fail at start instead of overwriting the
    first one's state at exit.
    """

    def __init__(self, filename: str, revoked: Any, clock: Optional[Any] = None,
                 protocol: int = pickle_protocol) -> None:
        self.filename = filename
        self.revoked = revoked
        self.clock = clock
        self.protocol = protocol
        self._db: Optional[shelve.Shelf] = None

    def _open(self) -> shelve.Shelf:
        if self._db is None:
            self._db = shelve.open(self.filename, protocol=self.protocol, writeback=True)
        return self._db

    def load(self) -> int:
        """Merge the saved revoked ids and clock into ours; returns how many ids were read."""
        db = self._open()
        saved = saved_revoked(db)
        ids = list(saved) if saved else []
        if ids:
            self.revoked.update(ids)
        self.revoked.purge()  # ids that expired while the worker was down
        if self.clock is not None:
            db["clock"] = self.clock.adjust(db.get("clock") or 0)
        return len(ids)

    def save(self) -> None:
        """Write the revoked set and the clock, flush to disk and close the file."""
        db = self._open()
        try:
            self.revoked.purge()
            db.update({
                "__proto__": LAYOUT_VERSION,
                "zrevoked": zlib.compress(pickle.dumps(self.revoked, protocol=self.protocol)),
                "clock": self.clock.forward() if self.clock is not None else 0,
            })
            db.sync()
        finally:
            self.close()

    def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            db.close()


def saved_revoked(db: Any) -> Any:
    """The revoked collection stored in an open shelf, in any of Celery's layouts.

    ``None`` when there is none. The legacy ``revoked`` key is removed from
    ``db`` (a writeback shelf), as Celery does, once it has been read.
    """
    if "zrevoked" in db:
        packed = db["zrevoked"]
        return pickle.loads(zlib.decompress(packed)) if packed else None
    if "revoked" in db:
        return db.pop("revoked")
    return None
