"""Fuzz: junk remote-control messages never escape the mailbox, nor break what follows.

A real ``ControlMailbox`` (kombu's pidbox ``Node`` configured by a real
Celery app, ccworker's command handlers, a real ``Consumer`` as their
state) is handed generated control messages: bodies that are not mappings,
mappings with any ``method`` (every command ccworker answers, unknown
names, values that are not strings), any ``arguments`` (junk
of every type, for the right parameter names and others), junk
``destination``/``pattern``/``matcher``/``reply_to``/``ticket``, and junk
``clock`` headers. Replies go out through kombu's in-process ``memory://``
transport.

Properties: ``on_message`` never raises; afterwards the node still answers
``ping``, and the state the commands may have changed (revoked ids and
stamps, task time limits and rate limits) is still usable by the consumer
and the pools.

Budget: ``CCWORKER_FUZZ_EXAMPLES`` examples (default 1000); see
test_fuzz_protocol.py and docs/reliability.md#fuzzing for long runs.
"""

from __future__ import annotations

import os
import uuid

import pytest
from celery import Celery
from celery.utils.time import rate as celery_rate
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from kombu.message import Message

from celerycompat.consumer.consumer import Consumer
from celerycompat.consumer.decoder import make_decoder
from celerycompat.consumer.kombu_broker import KombuBroker
from celerycompat.control.commands import COMMANDS, ControlState
from celerycompat.control.mailbox import ControlMailbox
from celerycompat.execution.runner import RunSettings, TaskRunner
from celerycompat.pools.procproto import time_limits
from celerycompat.pools.solo import SoloPool

EXAMPLES = int(os.environ.get("CCWORKER_FUZZ_EXAMPLES", "1000"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=list(HealthCheck))
#: pytest-timeout's limit grows with the budget (a long run takes hours).
pytestmark = pytest.mark.timeout(max(300, EXAMPLES // 10))

HOSTNAME = "fuzz@control"
TASK = "t.fuzzed"

scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
           | st.binary(max_size=10))
junk = st.recursive(
    scalars,
    lambda inner: (st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=3)),
    max_leaves=8)

#: Parameter names the handlers take, so junk reaches their bodies.
PARAMETERS = ["task_id", "terminate", "signal", "task_name", "rate_limit", "hard", "soft",
              "ids", "queue", "exchange", "exchange_type", "routing_key", "taskinfoitems",
              "builtins", "safe", "with_defaults", "from_node", "revoked", "headers", "n",
              "max", "min", "modules", "reload", "reloader", "msg", "samples", "num",
              "max_depth", "type", "id", "topic", "action"]
plausible = {
    "task_name": st.sampled_from([TASK, "t.other"]) | junk,
    "task_id": st.uuids().map(str) | st.lists(st.uuids().map(str), max_size=2) | junk,
    "rate_limit": st.sampled_from(["10/s", "1/m", "0", "", "5/h", "1e400/s", "-1/s"]) | junk,
    "hard": st.floats() | st.integers(-5, 5) | junk,
    "soft": st.floats() | st.integers(-5, 5) | junk,
    "headers": st.dictionaries(st.text(max_size=5), junk, max_size=3)
    | st.lists(st.text(max_size=8), max_size=3) | junk,
}
arguments = (st.fixed_dictionaries({}, optional={
    name: plausible.get(name, junk) for name in PARAMETERS})
    | st.dictionaries(st.text(max_size=8), junk, max_size=3) | junk)
commands = st.sampled_from(sorted(COMMANDS) + ["no_such_command"])
reply_to = (st.none() | junk
            | st.fixed_dictionaries({"exchange": st.just("reply.celery.pidbox") | junk,
                                     "routing_key": st.uuids().map(str) | junk}))

def _requests(method: st.SearchStrategy) -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {"method": method},
        optional={"arguments": arguments,
                  "destination": st.just([HOSTNAME]) | st.just(HOSTNAME) | junk,
                  "pattern": junk, "matcher": st.sampled_from(["glob", "pcre"]) | junk,
                  "reply_to": reply_to, "ticket": st.uuids().map(str) | junk})


#: Mostly requests for real commands (three in four), then junk method names
#: and bodies that are not requests at all.
bodies = st.one_of(_requests(commands), _requests(commands), _requests(commands),
                   _requests(junk), junk)
headers = st.fixed_dictionaries({}, optional={"clock": st.integers(0, 10 ** 6) | junk})


class Node:
    """A ccworker's control node with everything behind it, but no broker connection
    (the consumer is never started: commands that talk to the broker see none)."""

    def __init__(self) -> None:
        self.app = app = Celery(f"fuzzctl{uuid.uuid4().hex[:6]}", broker="memory://",
                                backend="cache+memory://", set_as_current=False)
        app.conf.task_default_queue = f"fuzzctl{uuid.uuid4().hex[:6]}"

        @app.task(name=TASK)
        def fuzzed():
            return None

        app.finalize()
        runner = TaskRunner(app, RunSettings(hostname=HOSTNAME), lambda a, b: b)
        self.pool = SoloPool(runner, HOSTNAME)
        self.shutdowns = 0
        self.consumer = Consumer(
            app=app, broker_factory=lambda: KombuBroker(app.connection_for_read()),
            pool=self.pool, store=app.backend,
            queues=list(app.amqp.queues.consume_from.values()),
            decode=make_decoder(["json"]), hostname=HOSTNAME, prefetch_multiplier=4,
            control=self._mailbox)

    def _mailbox(self, consumer: Consumer) -> ControlMailbox:
        state = ControlState(app=self.app, hostname=HOSTNAME, consumer=consumer)
        return ControlMailbox(self.app, HOSTNAME, state, on_shutdown=self._on_shutdown)

    def _on_shutdown(self) -> None:
        self.shutdowns += 1

    @property
    def mailbox(self) -> ControlMailbox:
        return self.consumer.control


@pytest.fixture(scope="module")
def node():
    node = Node()
    yield node
    node.app.close()


def still_usable(node: Node) -> None:
    """What the worker reads after commands may have changed it."""
    reply = node.mailbox.node.handle_message({"method": "ping", "destination": [HOSTNAME]})
    assert reply == {"ok": "pong"}
    consumer = node.consumer
    assert str(uuid.uuid4()) not in consumer.revoked
    consumer.revoked_stamps.match(["k", "x"], {"k": "v", "x": [1, "y"]})
    task = node.app.tasks[TASK]
    hard, soft = time_limits((None, None), task, None, None)
    for limit in (hard, soft):
        assert limit is None or float(limit) > 0
    celery_rate(task.rate_limit)
    consumer.reset_rate_limits()


@FUZZ
@given(body=bodies, headers=headers)
def test_junk_control_messages_never_escape(node, body, headers):
    message = Message(body=b"", headers=headers, content_type="application/json",
                      content_encoding="utf-8")
    method = body.get("method") if isinstance(body, dict) else None
    event(f"method: {method}" if isinstance(method, str) else "method: junk or none")
    node.mailbox.on_message(body, message)
    still_usable(node)
