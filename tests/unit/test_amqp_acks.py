"""AckRuns: a turn's AMQP acks as ``basic.ack(multiple=True)`` runs (issue 18).

The property test plays a broker: it applies the frames `take` returns with
AMQP's rule (``multiple`` acks every unacked delivery up to the tag) and
checks that every owed ack lands exactly once and nothing still in hand is
ever acked, whatever order deliveries are owed, rejected or held in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from celerycompat.consumer.amqp_acks import AckRuns


@dataclass(eq=False)
class Msg:
    tag: int
    state: str = "RECEIVED"


@dataclass
class Channel:
    """The broker's view of one channel: the tags it counts as unacked."""

    unacked: set = field(default_factory=set)
    frames: int = 0

    def apply(self, last, singles) -> set:
        acked = set()
        if last is not None:
            self.frames += 1
            acked |= {tag for tag in self.unacked if tag <= last.tag}
        for message in singles:
            self.frames += 1
            assert message.tag in self.unacked, "an ack for a settled delivery"
            acked.add(message.tag)
        self.unacked -= acked
        return acked


def make_runs() -> AckRuns:
    return AckRuns(tag_of=lambda m: m.tag, settled=lambda m: m.state != "RECEIVED")


def deliver(runs, channel, tags):
    messages = [Msg(tag) for tag in tags]
    for message in messages:
        runs.delivered(message)
        channel.unacked.add(message.tag)
    return messages


def owe(runs, message):
    message.state = "ACK"
    runs.owe(message)


def test_a_drain_in_order_is_one_frame():
    runs, channel = make_runs(), Channel()
    messages = deliver(runs, channel, range(1, 9))
    for message in messages[:5]:
        owe(runs, message)
    last, singles = runs.take()
    assert (last.tag, singles) == (5, [])
    assert channel.apply(last, singles) == {1, 2, 3, 4, 5}
    assert runs.unsettled == 3


def test_a_held_delivery_ends_the_run():
    """An ETA task (tag 2) held: 1 goes alone, 3 and 4 one by one, 2 stays unacked."""
    runs, channel = make_runs(), Channel()
    messages = deliver(runs, channel, range(1, 5))
    for message in (messages[0], messages[2], messages[3]):
        owe(runs, message)
    last, singles = runs.take()
    assert last is None
    assert [m.tag for m in singles] == [1, 3, 4]
    channel.apply(last, singles)
    assert channel.unacked == {2}
    # The held one settles later; the next run starts behind it.
    more = deliver(runs, channel, [5, 6])
    owe(runs, messages[1])
    for message in more:
        owe(runs, message)
    last, singles = runs.take()
    assert (last.tag, singles) == (6, [])
    channel.apply(last, singles)
    assert channel.unacked == set()
    assert runs.unsettled == 0


def test_rejected_and_externally_acked_deliveries_do_not_stop_a_run():
    runs, channel = make_runs(), Channel()
    messages = deliver(runs, channel, range(1, 6))
    messages[1].state = "REJECTED"  # through the broker adapter's reject
    runs.discard(messages[1])
    channel.unacked.discard(2)
    messages[2].state = "ACK"  # a project's Request class acked it itself
    channel.unacked.discard(3)
    for message in (messages[0], messages[3]):
        owe(runs, message)
    last, singles = runs.take()
    assert (last.tag, singles) == (4, [])
    channel.apply(last, singles)
    assert channel.unacked == {5}


def test_nothing_owed_is_no_frame():
    runs = make_runs()
    deliver(runs, Channel(), [1, 2])
    assert runs.take() == (None, [])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["deliver", "owe", "reject", "external", "take"]),
                          st.integers(0, 1000)), max_size=80))
def test_frames_ack_exactly_what_is_owed(steps):
    runs, channel = make_runs(), Channel()
    in_hand: list[Msg] = []
    owed: set[int] = set()
    external = 0
    next_tag = 1

    def flush():
        last, singles = runs.take()
        acked = channel.apply(last, singles)
        assert acked == owed, "acked what was not owed, or missed an owed ack"
        owed.clear()

    for action, pick in steps:
        if action == "deliver":
            in_hand += deliver(runs, channel, [next_tag])
            next_tag += 1
        elif action == "take":
            flush()
        elif in_hand:
            message = in_hand.pop(pick % len(in_hand))
            if action == "owe":
                owe(runs, message)
                owed.add(message.tag)
            elif action == "reject":
                message.state = "REJECTED"
                runs.discard(message)
                channel.unacked.discard(message.tag)
            else:
                message.state = "ACK"
                channel.unacked.discard(message.tag)
                external += 1
    flush()
    assert channel.unacked == {m.tag for m in in_hand}
    # Only deliveries settled behind the adapter's back may linger listed.
    assert runs.unsettled <= len(in_hand) + external
