"""The consumer keeps its broker connection alive the way Celery's does.

Celery's consumer asks RabbitMQ for ``broker_heartbeat`` and ticks the
heartbeats at ``broker_heartbeat_checkrate``: that keeps an idle worker's
connection open and is how a dead one gets noticed. With a 2 s heartbeat a
worker that asked for it but never ticked would be dropped by RabbitMQ
within a few seconds of idling.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time

import pytest

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


def negotiated_timeouts(vhost_url: str) -> list[int]:
    """Heartbeat timeouts RabbitMQ agreed with the connections of the test vhost."""
    vhost = vhost_url.rsplit("/", 1)[-1] or "/"
    ctl = shlex.split(os.environ.get("CC_RABBITMQCTL", "rabbitmqctl"))
    out = subprocess.run([*ctl, "-q", "list_connections", "vhost", "timeout"],
                         capture_output=True, text=True, timeout=30).stdout
    timeouts = []
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) == 2 and parts[0] == vhost and parts[1].isdigit():
            timeouts.append(int(parts[1]))
    return timeouts


@pytest.mark.parametrize("kind", ["celery", "ccworker"])
def test_idle_worker_keeps_a_short_heartbeat_connection(kind, amqp_broker_url,
                                                        interop_log_dir):
    url, shared = amqp_broker_url
    if shared:
        pytest.fail("this test needs its own vhost (rabbitmqctl) to find the connection")
    broker = harness.BrokerEnv("amqp", url, shared)
    spec = harness.WorkerSpec(extra_flags=("--", "broker_heartbeat=2"))
    worker = harness.WorkerProcess(kind, spec, broker, interop_log_dir).start()
    try:
        worker.wait_ready()
        assert 2 in negotiated_timeouts(url), "the consumer did not ask for broker_heartbeat"
        time.sleep(10)  # five heartbeat intervals of idling
        with harness.client_app(spec.project, worker.env) as app:
            result = app.send_task("proj_basic.tasks.add", (2, 3))
            assert result.get(timeout=20) == 5
        assert "Connection to broker lost" not in worker.log(), worker.log_tail()
    finally:
        assert worker.stop() == 0
