"""The app and its steps: the three kinds real projects add.

* `LivenessProbe`, a worker step: the Kubernetes liveness recipe, a file
  touched on the worker's timer (every 0.2 s) and removed at shutdown; its
  path comes from ``--heartbeat-file``, an option the project adds to the
  worker's command line (``app.user_options['worker']``). Without the
  option the step is not included (``include_if``).
* `ExternalQueue`, a consumer step: consumes ``<CC_TEST_QUEUE>.external``,
  a queue of plain (non-Celery) JSON messages, on the worker's connection;
  each message is recorded and acked.
* `Lifecycle`, a consumer step that records what it is told and sees.

Every call is recorded (``ccit_recorder``) so the test can compare the
order of calls and what the steps saw under both workers.
``CC_TEST_STEP_WANTS`` names an attribute of the consumer the `Lifecycle`
step reads at start (for the test of a step needing what a worker lacks).
"""

import os
import threading
from pathlib import Path

from celery import Celery, bootsteps
from click import Option
from kombu import Consumer, Exchange, Queue

from ccit_recorder import record

app = Celery("proj_steps", include=["proj_steps.tasks"])
app.conf.update(
    broker_url=os.environ.get("CC_TEST_BROKER", "redis://127.0.0.1:6379/10"),
    result_backend=os.environ.get("CC_TEST_BACKEND", "redis://127.0.0.1:6379/11"),
    task_default_queue=os.environ.get("CC_TEST_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
)

app.user_options["worker"].add(
    Option(("--heartbeat-file",), default=None, help="A file touched while the worker lives."))

EXTERNAL = Queue(os.environ.get("CC_TEST_QUEUE", "celery") + ".external",
                 Exchange("ccit.external", type="direct"),
                 routing_key=os.environ.get("CC_TEST_QUEUE", "celery") + ".external")


class LivenessProbe(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, heartbeat_file=None, **kwargs):
        super().__init__(worker, **kwargs)
        self.path = Path(heartbeat_file) if heartbeat_file else None
        self.tref = None
        # A touch already under way when stop() runs (the gevent pool's
        # timer greenlet, a timer thread) must not bring the file back after
        # it is removed: once CI saw a Celery gevent worker leave it behind.
        self.lock = threading.Lock()
        self.stopped = False
        record("liveness.init", option=heartbeat_file is not None)

    def include_if(self, worker):
        return self.path is not None

    def start(self, worker):
        record("liveness.start", app=worker.app.main, same_node=worker.hostname.startswith("w"))
        self.stopped = False
        self.path.touch()
        self.tref = worker.timer.call_repeatedly(0.2, self.touch, (worker,), priority=10)

    def touch(self, worker):
        with self.lock:
            if not self.stopped:
                self.path.touch()

    def info(self, worker):
        return {"liveness": {"file": self.path.name}}

    def stop(self, worker):
        record("liveness.stop")
        with self.lock:
            self.stopped = True
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None
            self.path.unlink(missing_ok=True)


class ExternalQueue(bootsteps.ConsumerStep):
    def get_consumers(self, channel):
        return [Consumer(channel, queues=[EXTERNAL], callbacks=[self.on_message],
                         accept=["json"])]

    def on_message(self, body, message):
        record("external.message", body=body)
        message.ack()


class Lifecycle(bootsteps.StartStopStep):
    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        record("lifecycle.init", heartbeat_option="heartbeat_file" in kwargs)

    def start(self, c):
        wants = os.environ.get("CC_TEST_STEP_WANTS")
        if wants:
            getattr(c, wants)
        record("lifecycle.start", app=c.app.main,
               connected=c.connection is not None and c.connection.connected,
               queues=[q.name == os.environ.get("CC_TEST_QUEUE", "celery")
                       for q in c.task_consumer.queues],
               controller=c.controller.hostname == c.hostname)

    def info(self, c):
        return {"lifecycle": {"connected": c.connection is not None}}

    def stop(self, c):
        record("lifecycle.stop")

    def shutdown(self, c):
        record("lifecycle.shutdown")


app.steps["worker"].add(LivenessProbe)
app.steps["consumer"].add(ExternalQueue)
app.steps["consumer"].add(Lifecycle)
