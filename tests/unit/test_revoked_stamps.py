"""Revocation by canvas stamp: message fields, matching, the control command's replies.

The oracle is Celery itself: messages come from a real client's
``Signature.stamp`` and ``app.amqp.as_task_v2``; which message a revoked
stamp stops is compared with Celery's own worker ``Request.revoked()``; the
command's replies with Celery's own ``revoke_by_stamped_headers`` handler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timezone
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery
from celery.canvas import StampingVisitor
from celery.worker import control as celery_control
from celery.worker import state as celery_state
from celery.worker.request import Request as CeleryRequest
from hypothesis import given, settings
from hypothesis import strategies as st

from celerycompat.consumer.revoked_stamps import RevokedStamps, intersecting, parse_cli_headers
from celerycompat.control import commands
from celerycompat.protocol import codecs
from celerycompat.protocol import message as wire

ACCEPT = codecs.prepare_accept(["json"])


def decode(body, content_type, content_encoding):
    return codecs.loads(body, content_type, content_encoding, ACCEPT)


@pytest.fixture(scope="module")
def app():
    app = Celery("stamps", set_as_current=False)

    @app.task(name="t.add", shared=False)
    def add(x, y):
        return x + y

    return app


@pytest.fixture
def celery_revoked_stamps():
    """Celery's module-global revoked stamps, empty before and after a test."""
    celery_state.revoked_stamps.clear()
    yield celery_state.revoked_stamps
    celery_state.revoked_stamps.clear()


class Visitor(StampingVisitor):
    def __init__(self, stamps: dict) -> None:
        self.stamps = stamps

    def on_signature(self, sig, **headers) -> dict:
        return dict(self.stamps)


def stamped_message(app, task_id: str = "id-1", **stamps: Any):
    """The headers and body a real client sends for ``add.s(1, 2)`` stamped with ``stamps``."""
    sig = app.signature("t.add", (1, 2))
    if stamps:
        sig.stamp(Visitor(stamps))
    return app.amqp.as_task_v2(task_id, "t.add", (1, 2), **sig.options)


def parsed(message) -> wire.TaskMessage:
    from kombu.utils.json import dumps

    body = dumps(message.body).encode()
    headers = dict(message.headers)
    peeked = wire.peek(headers, body, "application/json", "utf-8", decode)
    return wire.parse(peeked, headers, {}, {}, body, "application/json", "utf-8", decode,
                      worker_utc=True, worker_tz=timezone.utc)


# -- message fields -----------------------------------------------------------------


def test_stamps_of_a_stamped_signature(app):
    out = parsed(stamped_message(app, mystamp="x", multi=["a", "b"]))
    assert sorted(out.stamped_headers) == ["multi", "mystamp"]
    assert out.stamps == {"mystamp": "x", "multi": ["a", "b"]}
    # Left in the request as sent: task.request.stamps is Celery's.
    assert out.request["stamps"] == {"mystamp": "x", "multi": ["a", "b"]}


def test_unstamped_message_has_no_stamps(app):
    out = parsed(stamped_message(app))
    assert (out.stamped_headers, out.stamps) == ([], {})


@pytest.mark.parametrize("headers, expected", [
    ({"stamped_headers": ["s"], "stamps": {}}, (["s"], {"s": None})),
    ({"stamped_headers": ["s"], "stamps": {"s": 1, "other": 2}}, (["s"], {"s": 1})),
    ({"stamped_headers": "s", "stamps": {"s": 1}}, ([], {})),
    ({"stamped_headers": ["s", 3], "stamps": ["junk"]}, (["s"], {"s": None})),
    ({"stamped_headers": None, "stamps": None}, ([], {})),
])
def test_malformed_stamp_fields_are_no_stamps(app, headers, expected):
    message = stamped_message(app)
    message.headers.update(headers)
    out = parsed(message)
    assert (out.stamped_headers, out.stamps) == expected


# -- matching, against Celery's Request.revoked() -----------------------------------------


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def celery_verdict(app, message) -> Any:
    """What Celery's worker decides for ``message``: None, or the header it logs."""
    fake_message = SimpleNamespace(headers=message.headers, body=message.body,
                                   delivery_info={}, properties={}, content_type=None,
                                   content_encoding=None, payload=message.body)
    request = CeleryRequest(fake_message, app=app, task=app.tasks["t.add"],
                            headers=dict(message.headers), body=message.body, decoded=True)
    # Only the side effects (backend, event, ack) are cut off; the decision is Celery's.
    request._announce_revoked = lambda *args, **kwargs: None
    logger = logging.getLogger("celery.worker.request")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        revoked = request.revoked()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if not revoked:
        return None
    return handler.lines[-1].split("(revoked by header: ", 1)[1][:-1]


VALUES = st.sampled_from(["a", "b", "c", 1])
STAMP_VALUE = st.one_of(VALUES, st.lists(VALUES, max_size=3))
NAMES = st.sampled_from(["s1", "s2", "s3"])


@settings(max_examples=150, deadline=None)
@given(stamps=st.dictionaries(NAMES, STAMP_VALUE, max_size=3),
       commands_sent=st.lists(st.dictionaries(NAMES, STAMP_VALUE, min_size=1, max_size=2),
                              max_size=3))
def test_matching_is_celerys(app, stamps, commands_sent):
    celery_state.revoked_stamps.clear()
    try:
        ours = RevokedStamps()
        for headers in commands_sent:
            ours.add(headers)
            celery_control.revoke_by_stamped_headers(SimpleNamespace(), headers)
        message = stamped_message(app, **stamps)
        expected = celery_verdict(app, message)
        found = ours.match(parsed(message).stamped_headers, parsed(message).stamps)
        assert (str(found) if found is not None else None) == expected
    finally:
        celery_state.revoked_stamps.clear()


def test_values_accumulate_per_name():
    revoked = RevokedStamps()
    assert not revoked and revoked.match(["s"], {"s": "a"}) is None
    revoked.add({"s": "a"})
    revoked.add({"s": ["b", "c"], "t": "x"})
    assert revoked.as_dict() == {"s": ["a", "b", "c"], "t": ["x"]}
    assert revoked.match(["t", "s"], {"s": ["z", "c"], "t": "y"}) == {"s": "c"}
    assert revoked.match(["s", "t"], {"s": "b", "t": "x"}) == {"s": "b"}
    assert revoked.match(["u"], {"u": "a"}) is None
    with pytest.raises(TypeError):
        revoked.add({"s": None})


def test_intersecting_is_what_terminate_looks_for():
    assert intersecting({"s": ["a", "b"], "t": None}, {"s": ["b", "c"], "t": "x"}) == {"s": {"b"}}
    assert intersecting({"s": "a"}, {"s": "a"}) == {"s": {"a"}}
    assert intersecting({"s": "a"}, {"u": "a"}) == {}


@pytest.mark.parametrize("given, expected", [
    (["s=a"], {"s": "a"}),
    (["s=a", "s=b", "t=c"], {"s": "b", "t": "c"}),
    (["s=a=b"], {"s": "a"}),
    (["s="], {"s": ""}),
    ([], {}),
    ({"s": ["a"]}, {"s": ["a"]}),
])
def test_cli_headers(given, expected):
    assert parse_cli_headers(given) == expected


# -- the command's replies, against Celery's handler --------------------------------------


@dataclass
class _Consumer:
    """What the command reads from the consumer: the revoked stamps and running requests."""

    revoked_stamps: RevokedStamps = field(default_factory=RevokedStamps)
    running: list = field(default_factory=list)
    terminated: list = field(default_factory=list)

    def active_requests(self) -> list:
        return self.running

    def revoked_updated(self) -> None:
        """Nothing waits in a pool here."""

    def terminate(self, request: Any, signum: int) -> bool:
        self.terminated.append((request.id, signum))
        return True


def ours(arguments: dict, consumer: _Consumer | None = None) -> Any:
    state = commands.ControlState(app=None, hostname="n@h", consumer=consumer or _Consumer())
    try:
        return commands.COMMANDS["revoke_by_stamped_headers"](state, **arguments)
    except Exception as exc:  # kombu's pidbox replies {"error": repr(exc)}
        return {"error": repr(exc)}


def celerys(arguments: dict) -> Any:
    state = SimpleNamespace(consumer=SimpleNamespace(pool=None))
    try:
        return celery_control.revoke_by_stamped_headers(state, **arguments)
    except Exception as exc:
        return {"error": repr(exc)}


@pytest.mark.parametrize("arguments", [
    {"headers": ["mystamp=x"]},
    {"headers": ["a=1", "b=2", "a=3"]},
    {"headers": []},
    {"headers": ["novalue"]},
    {"headers": {"mystamp": ["x", "y"]}},
    {"headers": {"mystamp": "x"}, "terminate": False, "signal": "SIGKILL"},
    {"headers": {"mystamp": "x"}, "terminate": True},
    {"headers": {"mystamp": "x"}, "terminate": True, "signal": "KILL"},
    {"headers": {"mystamp": "x"}, "signal": "SIGNOPE"},
    {"headers": {"mystamp": "x"}, "signal": "kill"},
    {"headers": {"mystamp": None}},
])
def test_replies_are_celerys(celery_revoked_stamps, arguments):
    consumer = _Consumer()
    assert ours(arguments, consumer) == celerys(arguments)
    assert consumer.revoked_stamps.as_dict() == celery_revoked_stamps


def test_terminate_ends_the_running_matches_with_celerys_reply(app):
    running = SimpleNamespace(id="id-run", message=parsed(stamped_message(app, "id-run",
                                                                          mystamp="x")))
    other = SimpleNamespace(id="id-other", message=parsed(stamped_message(app, "id-other",
                                                                          mystamp="y")))
    consumer = _Consumer(running=[running, other])
    reply = ours({"headers": {"mystamp": "x"}, "terminate": True, "signal": "KILL"}, consumer)
    # Celery's reply shows the repr of its defaultdict(set) of matched values.
    assert reply == {"ok": "headers defaultdict(<class 'set'>, {'mystamp': {'x'}}) revoked"}
    assert consumer.terminated == [("id-run", 9)]
    # The stamp is revoked as well: the task is not run again if redelivered.
    assert consumer.revoked_stamps.match(["mystamp"], {"mystamp": "x"}) == {"mystamp": "x"}
