"""Mingle's request goes out on its own connection (control/mingle.py).

kombu's mailbox publishes through the app's producer pool whatever
connection it is handed; after a RabbitMQ restart that pool's connection is
the one the broker closed, and every second reconnection logged
``mingle: could not reach the other workers: ConnectionForced(...)``
(issue 19). Here the app's pool is broken outright: the request must not
touch it. The memory transport stands in for the broker (pure logic: what
crosses the wire is covered by tests/interop/test_mingle_alone.py and
test_faults.py).
"""

from __future__ import annotations

import logging

from celery import Celery

from celerycompat.control.mingle import Mingle


class BrokenPool:
    """The app's producer pool after a broker restart, at its worst."""

    def acquire(self, *args, **kwargs):
        raise ConnectionResetError("the pooled connection was closed by the broker")


def test_hello_is_published_on_mingles_own_connection(caplog, monkeypatch):
    app = Celery("mingle", broker="memory://", set_as_current=False)
    monkeypatch.setattr(type(app.amqp), "producer_pool", BrokenPool(), raising=False)
    mingle = Mingle(app, "w1@host", revoked=set(), timeout=0.05)
    caplog.set_level(logging.INFO, logger="celery.worker.consumer.mingle")
    mingle.begin()
    mingle._thread.join(10)
    mingle.poll()
    assert mingle.done
    assert "could not reach" not in caplog.text, caplog.text
    assert "mingle: all alone" in caplog.text
