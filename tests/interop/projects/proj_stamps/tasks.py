"""Tasks of ``proj_stamps`` and the stamping visitor clients use.

``ran`` records say a task body ran (a task revoked by stamp must not);
``seen_stamps`` returns what the task sees of its own stamps
(``self.request``), which a worker must pass through unchanged.
"""

import time

from celery.canvas import StampingVisitor

from ccit_recorder import record

from .celery import app


class Stamps(StampingVisitor):
    """Stamps every signature of a canvas with the given headers."""

    def __init__(self, **stamps):
        self.stamps = stamps

    def on_signature(self, sig, **headers):
        return dict(self.stamps)


def stamped(sig, **stamps):
    """``sig`` stamped with ``stamps`` (a value or a list of values per name)."""
    sig.stamp(visitor=Stamps(**stamps))
    return sig


@app.task(bind=True)
def add(self, x, y):
    record("ran", id=self.request.id)
    return x + y


@app.task(bind=True)
def seen_stamps(self):
    record("ran", id=self.request.id)
    return {"stamped_headers": sorted(self.request.stamped_headers or []),
            "stamps": self.request.stamps}


@app.task(bind=True)
def slow(self, seconds):
    record("ran", id=self.request.id)
    time.sleep(seconds)
    return seconds


@app.task
def noop():
    """A sentinel: once its result exists, earlier messages were handled."""
    return "done"
