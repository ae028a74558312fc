"""The project of the fault-injection tests (tests/interop/test_faults.py).

Configured from ``CC_TEST_*`` variables as ``proj_basic`` is, plus:

``CC_TEST_VT``            Redis ``visibility_timeout`` in seconds: how long a
                          dead worker's un-acked messages wait before any
                          consumer restores them. Every consumer looks for
                          them every second (``unacked_restore_interval=1``,
                          throttle 1), so the wait is the timeout, not an hour.
``CC_TEST_CONFIRM``       ``1``: publisher confirms on AMQP, so a publish
                          that returned is on the broker's disk and survives
                          a broker killed with SIGKILL.

Everything else (``broker_connection_retry*``, ``broker_heartbeat``...) is
Celery's default unless the test passes ``key=value`` on the command line.
"""

import os

from celery import Celery, signals

from ccit_recorder import record

app = Celery("proj_faults", include=["proj_faults.tasks"])
transport_options = {}
if os.environ.get("CC_TEST_BROKER", "").startswith("redis"):
    transport_options.update(
        visibility_timeout=float(os.environ.get("CC_TEST_VT", "3600")),
        unacked_restore_interval=1,
        unacked_restore_throttle=1,
    )
if os.environ.get("CC_TEST_CONFIRM") == "1":
    transport_options["confirm_publish"] = True
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    broker_transport_options=transport_options,
    broker_connection_retry_on_startup=True,
)


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    record("worker_ready", hostname=getattr(sender, "hostname", None))
