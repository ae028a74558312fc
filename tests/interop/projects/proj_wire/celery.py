"""The app of ``proj_wire``: the harness's ``CC_TEST_*`` variables plus variants.

Harness variables (set for the worker and the client alike):

``CC_TEST_BROKER``, ``CC_TEST_BACKEND``   broker and result backend URLs
``CC_TEST_QUEUE``                         ``task_default_queue``, unique per worker;
                                          every extra queue below is named after it
``CC_TEST_RECORD_URL``, ``CC_TEST_RECORD`` where ``ccit_recorder.record`` RPUSHes

Variant variables (one worker per distinct combination):

``CC_WIRE_RESULT_SERIALIZER``  ``result_serializer`` (default ``json``)
``CC_WIRE_ACKS_ON_FAILURE``    ``0`` sets ``task_acks_on_failure_or_timeout=False``
``CC_WIRE_RESULT_EXTENDED``    ``1`` sets ``result_extended=True``
``CC_WIRE_ROUTING``            ``1`` declares ``task_queues`` and ``task_routes``
                               (see ``wire_queues``), for ``-Q``/``-X`` scenarios

The worker accepts every serializer kombu ships (json, msgpack, yaml,
pickle), for task bodies and results: what a mixed-producer deployment
configures. A Celery worker refuses to run as root with pickle accepted
unless ``C_FORCE_ROOT`` is set; the tests set it (CI containers run as root).
"""

import os

from celery import Celery
from kombu import Exchange, Queue

ALL_CONTENT = ["json", "msgpack", "yaml", "pickle"]

QUEUE = os.environ.get("CC_TEST_QUEUE", "celery")

#: Names of the extra queues, relative to ``QUEUE`` (the harness normalises
#: the queue name itself to ``<queue>``, so these read ``<queue>.second``...).
SECOND = QUEUE + ".second"
TOPIC = QUEUE + ".topic"
TOPIC_EXCHANGE = QUEUE + ".tx"
ADHOC = QUEUE + ".adhoc"            # not in task_queues: created from -Q / routes
EXCLUDED = QUEUE + ".excluded"      # in task_queues, removed with -X
UNCONSUMED = QUEUE + ".unconsumed"  # in task_queues, left out of -Q


def wire_queues():
    """``task_queues`` of the routing variant: the default queue (declared as
    Celery declares its default one), two direct queues, a queue bound to a
    topic exchange with a wildcard key, and two queues a worker is told not
    to consume."""
    def direct(name):
        return Queue(name, Exchange(name, type="direct"), routing_key=name)

    return [
        direct(QUEUE),
        direct(SECOND),
        Queue(TOPIC, Exchange(TOPIC_EXCHANGE, type="topic"), routing_key="wire.topic.#"),
        direct(EXCLUDED),
        direct(UNCONSUMED),
    ]


def wire_routes():
    return {
        "proj_wire.tasks.routed_second": {"queue": SECOND},
        "proj_wire.tasks.routed_topic": {"queue": TOPIC, "routing_key": "wire.topic.routed"},
        "proj_wire.tasks.routed_adhoc": {"queue": ADHOC},
    }


app = Celery("proj_wire", include=["proj_wire.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=QUEUE,
    accept_content=ALL_CONTENT,
    result_accept_content=ALL_CONTENT,
    result_serializer=os.environ.get("CC_WIRE_RESULT_SERIALIZER", "json"),
    task_acks_on_failure_or_timeout=os.environ.get("CC_WIRE_ACKS_ON_FAILURE", "1") != "0",
    result_extended=os.environ.get("CC_WIRE_RESULT_EXTENDED", "") == "1",
    broker_connection_retry_on_startup=True,
)
if os.environ.get("CC_WIRE_ROUTING") == "1":
    app.conf.task_queues = wire_queues()
    app.conf.task_routes = wire_routes()

# Receivers connected from the module ``-A`` imports (``celeryd_init`` and
# friends fire before ``include`` modules are imported).
from . import signals  # noqa: E402,F401
