"""RabbitMQ quorum queues (``task_default_queue_type = "quorum"``).

RabbitMQ refuses global QoS on a quorum queue (``NOT_IMPLEMENTED``); Celery
detects quorum queues (``worker_detect_quorum_queues``) and asks for
per-consumer QoS, logging ``Global QoS is disabled. Prefetch count is now
static.``. Before ccworker did the same it reconnected in a loop and ran
nothing. Differential: same results, same log line.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]


@pytest.mark.parametrize("broker", ["amqp"], indirect=True)
def test_tasks_run_from_a_quorum_queue(broker, run_differential):
    def scenario(app, observe):
        observe.get(observe.send("add", (2, 3)), "add")
        observe.record("static-qos-line",
                       "Global QoS is disabled. Prefetch count is now static."
                       in observe.worker.log())
        observe.log_problems("log")

    celery_obs, cc_obs = run_differential(scenario, broker, project="proj_quorum")
    assert celery_obs["add"]["value"] == 5
    assert celery_obs["static-qos-line"] is True
    assert celery_obs == cc_obs
