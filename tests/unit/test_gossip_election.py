"""Gossip elections (control/gossip.py): the order events arrive in.

CI caught an ack overtaking the election requests on a loaded machine:
deciding on an empty request heap raised IndexError inside kombu's event
loop (as Celery's own Gossip step would), which lost the event and left the
node's gossip unable to report the lost peer afterwards.
"""

from __future__ import annotations

from celery import Celery

from celerycompat.control.gossip import Gossip


class SentEvents:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def send(self, kind: str, **fields) -> None:
        self.sent.append((kind, fields))


def make_gossip() -> tuple[Gossip, list]:
    app = Celery("gossipunit", broker="memory://", set_as_current=False)
    gossip = Gossip(app, "me@host", 100, SentEvents())
    won: list = []
    gossip.election_handlers["task"] = won.append
    return gossip, won


def request(node: str, pid: int, clock: int) -> dict:
    return {"id": "e1", "clock": clock, "hostname": node, "pid": pid, "topic": "task",
            "action": {"task": "t"}}


def test_an_ack_before_any_request_waits_for_the_request():
    gossip, won = make_gossip()
    gossip.election("e1", "task", action={"task": "t"})
    gossip.on_elect_ack({"id": "e1", "hostname": "other@host"})  # raised IndexError
    assert won == [] and "e1" in gossip.consensus_replies
    gossip.on_elect(request("me@host", 100, clock=1))
    assert won == [{"task": "t"}]  # decided by the request that came later
    assert "e1" not in gossip.consensus_replies


def test_the_lowest_clock_wins_once():
    gossip, won = make_gossip()
    gossip.election("e1", "task", action={"task": "t"})
    gossip.on_elect(request("other@host", 7, clock=5))
    gossip.on_elect(request("me@host", 100, clock=9))
    gossip.on_elect_ack({"id": "e1", "hostname": "other@host"})
    assert won == []  # other@host.7 has the lower clock: it runs the action
    gossip.on_elect_ack({"id": "e1", "hostname": "me@host"})
    assert won == []


def test_a_handler_error_stays_out_of_the_event_loop(caplog):
    gossip, _ = make_gossip()
    gossip.election("e1", "task", action={"task": "t"})

    def broken(action):
        raise RuntimeError("boom")

    gossip.election_handlers["task"] = broken

    class Message:
        delivery_info = {"routing_key": "worker.elect"}
        headers: dict = {}
        payload = request("me@host", 100, clock=1)

    gossip.on_message(lambda payload: (None, payload), Message())  # must not raise
    assert "could not handle an event" in caplog.text


def test_with_a_live_peer_one_request_is_not_enough():
    import time

    gossip, won = make_gossip()
    now = time.time()
    gossip.state.event({"type": "worker-heartbeat", "hostname": "other@host",
                        "timestamp": now, "local_received": now, "freq": 2.0,
                        "clock": 1, "pid": 7})
    assert len(set(gossip.state.alive_workers())) == 1
    gossip.election("e1", "task", action={"task": "t"})
    gossip.on_elect(request("me@host", 100, clock=3))
    gossip.on_elect_ack({"id": "e1", "hostname": "other@host"})  # Celery: IndexError
    assert won == [] and "e1" in gossip.consensus_replies
    gossip.on_elect(request("other@host", 7, clock=4))
    assert won == [{"task": "t"}]  # me@host.100 has the lower clock
    assert "e1" not in gossip.consensus_replies


def test_a_peer_request_before_our_own_is_acked_after_our_request():
    """A Celery peer that gets our ack before our request decides on one
    request and dies of IndexError: our request goes out first."""
    gossip, _ = make_gossip()
    gossip.on_elect(request("other@host", 7, clock=5))
    assert gossip.dispatcher.sent == []
    gossip.on_elect(request("third@host", 8, clock=6))
    gossip.election("e1", "task", action={"task": "t"})
    assert [kind for kind, _ in gossip.dispatcher.sent] == [
        "worker-elect", "worker-elect-ack", "worker-elect-ack"]


def test_held_acks_go_after_the_hold_when_no_election_of_ours_comes():
    now = [100.0]
    app = Celery("gossipunit", broker="memory://", set_as_current=False)
    gossip = Gossip(app, "me@host", 100, SentEvents(), clock=lambda: now[0])
    gossip.on_elect(request("other@host", 7, clock=5))
    gossip.tick()
    assert gossip.dispatcher.sent == []
    now[0] += 1.01
    gossip.tick()
    assert gossip.dispatcher.sent == [("worker-elect-ack", {"id": "e1"})]
    gossip.tick()
    assert len(gossip.dispatcher.sent) == 1
