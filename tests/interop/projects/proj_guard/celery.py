"""The Celery app of ``proj_guard``, configured from ``CC_TEST_*`` variables.

``CC_TEST_BROKER``, ``CC_TEST_BACKEND``, ``CC_TEST_QUEUE``,
``CC_TEST_RECORD_URL`` and ``CC_TEST_RECORD`` mean what they mean for
``proj_basic``. Two more:

``CC_TEST_SECURITY_DIR``   sign and verify every message as the Celery docs
                           say: ``security_key``/``security_certificate``
                           (``worker.key``/``worker.pem`` in that directory),
                           ``security_cert_store`` (``store/*.pem``),
                           ``task_serializer = "auth"``,
                           ``accept_content = ["auth"]``, then
                           ``app.setup_security()``. Results stay JSON
                           (``result_accept_content``).
``CC_TEST_REMOTE_CONTROL`` ``0``: ``worker_enable_remote_control = False``.
"""

import os

from celery import Celery, signals

from ccit_recorder import record

app = Celery("proj_guard", include=["proj_guard.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    worker_enable_remote_control=os.environ.get("CC_TEST_REMOTE_CONTROL", "1") != "0",
    broker_connection_retry_on_startup=True,
)

SECURITY_DIR = os.environ.get("CC_TEST_SECURITY_DIR")
if SECURITY_DIR:
    app.conf.update(
        security_key=os.path.join(SECURITY_DIR, "worker.key"),
        security_certificate=os.path.join(SECURITY_DIR, "worker.pem"),
        security_cert_store=os.path.join(SECURITY_DIR, "store", "*.pem"),
        task_serializer="auth",
        accept_content=["auth"],
        result_accept_content=["json"],
    )
    app.setup_security()


@signals.worker_ready.connect
def on_worker_ready(sender=None, **kwargs):
    # The harness waits for this record before it calls a worker ready.
    record("worker_ready", hostname=getattr(sender, "hostname", None))


@signals.task_rejected.connect
def on_task_rejected(sender=None, message=None, exc=None, **kwargs):
    record("task_rejected", exc=type(exc).__name__ if exc is not None else None)
