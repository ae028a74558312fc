"""The Celery app of ``proj_basic``, configured from ``CC_TEST_*`` variables.

Variables (the harness sets them for the worker and the client alike):

``CC_TEST_BROKER``          broker URL (Redis db 10 or a RabbitMQ vhost)
``CC_TEST_BACKEND``         result backend URL (Redis db 11, or ``rpc://``)
``CC_TEST_QUEUE``           ``task_default_queue``: unique per worker so
                            concurrent runs never share a queue
``CC_TEST_RECORD_URL``      Redis URL hooks and signals write to
``CC_TEST_RECORD``          name of the Redis list they RPUSH to
``CC_TEST_RESULT_EXTENDED`` ``1`` turns on ``result_extended``
``CC_TEST_TRANSPORT_OPTIONS`` ``broker_transport_options`` as JSON (Sentinel's
                            ``master_name``; test_broker_urls.py)
``CC_TEST_BROKER_CA``       a CA file: the broker is TLS, its certificate
                            verified against it (test_broker_urls.py)

Nothing else is configured: every other setting keeps Celery's default, the
defaults being exactly what a drop-in replacement has to reproduce.
"""

import json
import os
import ssl

from celery import Celery

app = Celery("proj_basic", include=["proj_basic.tasks", "proj_basic.signals"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    result_extended=os.environ.get("CC_TEST_RESULT_EXTENDED", "") == "1",
    # Only the broker connection is retried at startup as in a real deploy;
    # the value is Celery's default, spelled out to silence its 6.0 warning.
    broker_connection_retry_on_startup=True,
)

if os.environ.get("CC_TEST_TRANSPORT_OPTIONS"):
    app.conf.broker_transport_options = json.loads(os.environ["CC_TEST_TRANSPORT_OPTIONS"])
if os.environ.get("CC_TEST_BROKER_CA"):
    # The option names differ by transport: redis-py's, then py-amqp's.
    ca = os.environ["CC_TEST_BROKER_CA"]
    app.conf.broker_use_ssl = (
        {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": ca}
        if app.conf.broker_url.startswith("rediss")
        else {"cert_reqs": ssl.CERT_REQUIRED, "ca_certs": ca})

# Signal receivers are connected here, in the module ``-A`` imports, and not
# through ``include``: ``celeryd_init`` is sent before the worker imports the
# ``include`` modules, which is why Celery's docs tell users to do the same.
from . import signals  # noqa: E402,F401
