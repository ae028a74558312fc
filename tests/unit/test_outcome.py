"""Celery's acks rules (wire contract B6, B8) as one pure function."""

import pytest

from celerycompat.execution.outcome import Outcome, Settle, State, settle


@pytest.mark.parametrize("state", list(State))
def test_early_ack_is_settled_at_start(state):
    assert settle(Outcome(state), acks_late=False, acks_on_failure_or_timeout=True) \
        is Settle.NOTHING


@pytest.mark.parametrize("state,expected", [
    (State.SUCCESS, Settle.ACK),
    (State.RETRY, Settle.ACK),
    (State.IGNORED, Settle.ACK),
    (State.FAILURE, Settle.ACK),
])
def test_acks_late(state, expected):
    assert settle(Outcome(state), acks_late=True, acks_on_failure_or_timeout=True) is expected


def test_acks_late_failure_without_acks_on_failure_drops():
    assert settle(Outcome(State.FAILURE), acks_late=True,
                  acks_on_failure_or_timeout=False) is Settle.DROP


def test_acks_late_timeout_without_acks_on_timeout_requeues():
    assert settle(Outcome(State.FAILURE, is_timeout=True), acks_late=True,
                  acks_on_failure_or_timeout=False) is Settle.REQUEUE


@pytest.mark.parametrize("requeue,expected", [(True, Settle.REQUEUE), (False, Settle.DROP)])
def test_reject_follows_its_requeue_flag(requeue, expected):
    assert settle(Outcome(State.REJECTED, requeue=requeue), acks_late=True,
                  acks_on_failure_or_timeout=True) is expected
