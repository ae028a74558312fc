"""What running one task produced, and what that means for its message.

The runner (in a pool slot) reports an `Outcome`; the consumer thread turns
it into an ack, a reject or a requeue. Keeping the decision here, as a pure
function of the task's ack settings and the outcome, puts Celery's rules
(wire contract B6, B8) in one place for every pool.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class State(str, enum.Enum):
    SUCCESS = "SUCCESS"
    FAILURE = "FAILURE"
    RETRY = "RETRY"
    REJECTED = "REJECTED"
    IGNORED = "IGNORED"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    REVOKED = "REVOKED"
    """Ended by ``revoke(terminate=True)``: the consumer announced REVOKED when it
    asked the pool to terminate the run; the pool reports this once the run is gone."""


class Settle(str, enum.Enum):
    """What the consumer does with the message once the task is over."""

    ACK = "ack"
    DROP = "drop"  # reject, no requeue
    REQUEUE = "requeue"  # reject, back to the queue
    NOTHING = "nothing"  # already acked when the task started


@dataclass
class Outcome:
    """The result of one run, as the consumer needs it.

    ``retval`` (the return value or the exception) is only meaningful in
    the process that ran the task; everything else is plain data, so a
    pool that runs tasks in child processes can send an Outcome back.
    """

    state: State
    retval: Any = None
    runtime: float | None = None
    requeue: bool = False
    """For State.REJECTED: the Reject's own flag. For a lost worker: the
    task's ``reject_on_worker_lost`` applied (B9), nothing was stored."""
    is_timeout: bool = False
    is_worker_lost: bool = False
    """The pool process running the task died (or was lost) before reporting;
    the parent recorded the outcome (prefork, wire contract B9)."""
    result_repr: str | None = None
    """``saferepr`` of the return value (``task-succeeded.result``)."""
    exception_repr: str | None = None
    """``safe_repr`` of the exception (``task-failed/-retried.exception``)."""
    traceback: str | None = None
    pid: int | None = None
    """The process that ran it, where that is not the consumer's (prefork's
    child): a task's own ``Request.on_accepted`` gets it."""
    durable: Any = field(default=None, repr=False, compare=False)
    """The `backends.group_commit.Write` of the deferred SUCCESS write, or None
    (written already, or nothing to write). Never crosses a process."""

    def after_write(self, durable: Any) -> Outcome:
        """This outcome once its deferred write is done; a failed write makes
        it an internal error (the result is not stored, as a failing
        synchronous write would have)."""
        error = durable.exception()
        if error is None:
            return self
        return Outcome(State.INTERNAL_ERROR, error, runtime=self.runtime,
                       exception_repr=repr(error))


def settle(outcome: Outcome, *, acks_late: bool, acks_on_failure_or_timeout: bool) -> Settle:
    """Celery's acks_late rules (B6, B8) for a finished run.

    Early-acked messages were acked when the task started, except that a
    ``Reject`` still rejects a message that was not acked yet.
    """
    if outcome.state is State.REJECTED:
        if not acks_late:
            return Settle.NOTHING
        return Settle.REQUEUE if outcome.requeue else Settle.DROP
    if not acks_late:
        return Settle.NOTHING
    if outcome.is_worker_lost and outcome.requeue:
        return Settle.REQUEUE  # acks_late + reject_on_worker_lost (B9)
    if outcome.state in (State.FAILURE, State.INTERNAL_ERROR):
        if acks_on_failure_or_timeout:
            return Settle.ACK
        return Settle.REQUEUE if outcome.is_timeout else Settle.DROP
    return Settle.ACK
