"""Gossip: follow the other workers' events, keep the clock, hold elections (G5).

What a Celery worker's Gossip step does, observably: it consumes the
``worker.#`` events of the cluster on a queue of its own (Celery's
``EventReceiver`` queue: ``celeryev.<uuid>``, auto-deleted, with the
heartbeat interval as its message TTL), so it knows which nodes are alive
and logs ``missed heartbeat from <node>`` when one goes silent; it moves the
Lamport clock forward with its own events; and it holds the elections the
``election`` control command starts (``worker-elect`` / ``worker-elect-ack``
events; the node with the lowest clock stamp runs the action, e.g. a task
signature, exactly once in the cluster).

Like the pidbox, it rides on the consumer's broker connection (its own
channel) and is handled on the consumer thread between deliveries; it is
rebuilt on every (re)connection.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import defaultdict
from functools import partial
from typing import Any, Callable

from kombu import Consumer
from kombu.exceptions import ContentDisallowed, DecodeError

logger = logging.getLogger("celery.worker.consumer.gossip")

#: Transports Celery runs gossip on.
COMPATIBLE_TRANSPORTS = frozenset({"amqp", "redis"})
#: Celery's Gossip step: how often lost nodes are looked for.
CHECK_INTERVAL = 5.0
#: Celery's default ``heartbeat_interval`` for the receiver queue's TTL.
QUEUE_TTL = 2.0
#: How long an ack of another node's election request waits for this node's
#: own request (see `Gossip.on_elect`) when that never comes (remote
#: control off, or this node not addressed).
ACK_HOLD = 1.0


class Gossip:
    """One node's gossip. ``dispatcher`` sends the election events."""

    def __init__(self, app: Any, hostname: str, pid: int, dispatcher: Any,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.hostname = hostname
        self.full_hostname = f"{hostname}.{pid}"
        self.dispatcher = dispatcher
        self.state = app.events.State(on_node_join=self._joined, on_node_leave=self._left,
                                      max_tasks_in_memory=1)
        self.consensus_requests: dict[str, list] = defaultdict(list)
        self.consensus_replies: dict[str, list] = {}
        self.election_handlers: dict[str, Callable[[Any], None]] = {"task": self._call_task}
        self._clock = clock
        self._next_check = clock() + CHECK_INTERVAL
        #: Acks held back until this node's own request is out: election id ->
        #: [when to send them anyway, how many] (one per request received).
        self._held_acks: dict[str, list] = {}
        self._consumer: Any = None
        self._channel: Any = None

    # -- lifecycle: one per connection ----------------------------------------------

    @property
    def running(self) -> bool:
        """Listening on a connection (between `start` and `stop`)."""
        return self._channel is not None

    def start(self, connection: Any) -> None:
        self._channel = connection.channel()
        receiver = self.app.events.Receiver(self._channel, routing_key="worker.#",
                                            queue_ttl=QUEUE_TTL)
        self._consumer = Consumer(
            self._channel, queues=[receiver.queue], accept=receiver.accept, no_ack=True,
            on_message=partial(self.on_message,
                               partial(receiver.event_from_message, localize=False)))
        self._consumer.consume()

    def stop(self) -> None:
        consumer, channel = self._consumer, self._channel
        self._consumer = self._channel = None
        for close in (getattr(consumer, "cancel", None), getattr(channel, "close", None)):
            if close is None:
                continue
            try:
                close()
            except Exception:
                logger.debug("closing the gossip consumer failed", exc_info=True)

    # -- consumer hooks (consumer/observers.py) ------------------------------------

    def connected(self, broker: Any) -> None:
        """Follow the cluster on the new connection (a channel of its own),
        on the transports Celery gossips on."""
        if broker.driver_type in COMPATIBLE_TRANSPORTS:
            self.start(broker.connection)

    def disconnected(self) -> None:
        self.stop()

    def ticked(self) -> None:
        self.tick()

    def closed(self) -> None:
        self.stop()

    def tick(self) -> None:
        """On the consumer loop: send held acks that waited long enough; every
        5 s, forget nodes whose heartbeats stopped."""
        now = self._clock()
        for election_id, (due, _) in list(self._held_acks.items()):
            if now >= due:
                self._send_held_acks(election_id)
        if now < self._next_check:
            return
        self._next_check = now + CHECK_INTERVAL
        workers = self.state.workers
        for worker in [w for w in workers.values() if not w.alive]:
            logger.info("missed heartbeat from %s", worker.hostname)
            workers.pop(worker.hostname, None)

    # -- events in ------------------------------------------------------------------

    def on_message(self, prepare: Callable[[Any], Any], message: Any) -> None:
        try:
            kind = message.delivery_info["routing_key"]
            if kind.split(".", 1)[0] == "task":
                return  # Redis without fanout_patterns delivers every event
            if kind == "worker.elect":
                return self.on_elect(message.payload)
            if kind == "worker.elect.ack":
                return self.on_elect_ack(message.payload)
            hostname = (message.headers or {}).get("hostname") or message.payload["hostname"]
            if hostname == self.hostname:
                self.app.clock.forward()
                return
            _, event = prepare(message.payload)
            self.state.event(event)
        except (DecodeError, ContentDisallowed, TypeError, KeyError, AttributeError) as exc:
            logger.error("gossip: unusable event: %r", exc)
        except Exception as exc:  # noqa: BLE001 - never into kombu's event loop
            logger.error("gossip: could not handle an event: %r", exc, exc_info=True)

    def _joined(self, worker: Any) -> None:
        logger.debug("%s joined the party", worker.hostname)

    def _left(self, worker: Any) -> None:
        logger.debug("%s left", worker.hostname)

    # -- elections --------------------------------------------------------------------

    def election(self, id: str, topic: str, action: Any = None) -> None:
        """Start an election (the ``election`` control command)."""
        self.consensus_replies[id] = []
        self.dispatcher.send("worker-elect", id=id, topic=topic, action=action, cver=1)
        self._send_held_acks(id)

    def _send_held_acks(self, election_id: str) -> None:
        _, count = self._held_acks.pop(election_id, (None, 0))
        for _ in range(count):
            self.dispatcher.send("worker-elect-ack", id=election_id)

    def on_elect(self, event: dict) -> None:
        try:
            request = (event["clock"], f"{event['hostname']}.{event['pid']}",
                       event["topic"], event["action"])
            election_id = event["id"]
        except KeyError as exc:
            logger.error("election request missing field %s", exc)
            return
        heapq.heappush(self.consensus_requests[election_id], request)
        if election_id in self.consensus_replies:
            self.dispatcher.send("worker-elect-ack", id=election_id)
        else:
            # Another node's request came before this node's own (the
            # ``election`` broadcast reaches the nodes at different times).
            # Celery acks at once; a Celery peer that receives this ack before
            # our request decides on a one-request heap and dies of kombu's
            # IndexError (see `_maybe_decide`), which two Celery workers also
            # risk. Sending our request first (`election`), or after
            # ACK_HOLD, keeps the peer's heap at two.
            held = self._held_acks.setdefault(election_id, [self._clock() + ACK_HOLD, 0])
            held[1] += 1
        self._maybe_decide(election_id)

    def on_elect_ack(self, event: dict) -> None:
        election_id = event.get("id")
        replies = self.consensus_replies.get(election_id)
        if replies is None:
            return  # not ours
        replies.append(event.get("hostname"))
        self._maybe_decide(election_id)

    def _maybe_decide(self, election_id: Any) -> None:
        """Decide once every live node acked (Celery's rule) and the requests
        can be compared.

        kombu's ``sort_heap`` reads the first two requests, so Celery's
        Gossip raises IndexError inside the event loop when the acks come
        in before a second request (CI saw it on a loaded machine); the
        event is lost there. Here a decision waits for two requests (one
        when this node knows no other), and the request or ack that
        completes them decides.
        """
        replies = self.consensus_replies.get(election_id)
        requests = self.consensus_requests.get(election_id)
        if replies is None or not requests:
            return
        alive = len(set(self.state.alive_workers()))
        if len(replies) < alive or len(requests) < min(2, alive + 1):
            return
        if len(requests) == 1:
            _, leader, topic, action = requests[0]
        else:
            _, leader, topic, action = self.app.clock.sort_heap(requests)
        if leader == self.full_hostname:
            logger.info("I won the election %r", election_id)
            handler = self.election_handlers.get(topic)
            if handler is None:
                logger.error("Unknown election topic %r", topic)
            else:
                handler(action)
        else:
            logger.info("node %s elected for %r", leader, election_id)
        self.consensus_requests.pop(election_id, None)
        self.consensus_replies.pop(election_id, None)

    def _call_task(self, task: Any) -> None:
        try:
            self.app.signature(task).apply_async()
        except Exception as exc:
            logger.exception("Could not call task: %r", exc)
