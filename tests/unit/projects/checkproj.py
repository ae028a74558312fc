"""``ccworker check -A checkproj``: one of everything ``ccworker check`` reports.

Broker and queues are declared but never reached: the check connects to
nothing.
"""
from celery import Celery, bootsteps, signals
from celery.worker.request import Request
from kombu import Queue

app = Celery("checkproj", broker="amqp://guest:guest@127.0.0.1:1//", set_as_current=False)
app.conf.update(
    task_queues=[Queue("checkproj.quorum", queue_arguments={"x-queue-type": "quorum"})],
    task_default_queue="checkproj.quorum",
    worker_consumer="checkproj:NotUsedConsumer",
    worker_soft_shutdown_timeout=10.0,
    worker_deduplicate_successful_tasks=True,
    worker_lost_wait=3.0,
)


class HealthStep(bootsteps.StartStopStep):
    """A custom worker bootstep (e.g. a health-check server)."""


class AuditConsumer(bootsteps.ConsumerStep):
    """A custom message consumer."""

    def get_consumers(self, channel):
        return []


app.steps["worker"].add(HealthStep)
app.steps["consumer"].add(AuditConsumer)


@signals.eventlet_pool_started.connect
def on_eventlet_started(**kwargs):
    pass


class TimeoutAwareRequest(Request):
    def on_timeout(self, soft, timeout):
        super().on_timeout(soft, timeout)


@app.task(Request=TimeoutAwareRequest)
def custom_request():
    return 1


class PoolRequest(Request):
    def execute_using_pool(self, pool, **kwargs):
        return super().execute_using_pool(pool, **kwargs)


@app.task(Request=PoolRequest)
def pool_request():
    return 1


@app.task(Strategy="checkproj:custom_strategy")
def custom_strategy_task():
    return 2


def custom_strategy(task, app, consumer, **kwargs):  # pragma: no cover - never called
    raise NotImplementedError


@app.task(time_limit=30, soft_time_limit=20)
def limited():
    return 3


@app.task(rate_limit="10/s")
def rated():
    return 4
