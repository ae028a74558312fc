"""The inspect and control commands a ccworker answers (wire contract F8-F11):
here those about tasks, queues and revokes, and `handlers_for`, which
collects every command (control/worker_commands.py has the worker's, its
pool's, events' and debugging ones; control/registry.py how one is declared).

Each command is a function ``(state, **arguments) -> reply`` with the name
and reply shape of the installed Celery's command (5.7's, and where an older
release answered otherwise, that release's: see ``celery_release``), so
``celery inspect``, ``celery control``, ``celery status`` and Flower parse
the replies as they parse a Celery worker's. ``state`` is a `ControlState`, with the attributes
(``app``, ``hostname``, ``consumer``) that custom commands registered with
``@inspect_command``/``@control_command`` read from Celery's own state.

Commands that need machinery ccworker does not have yet are not
registered: a client asking for one gets Celery's answer to an unknown
command, ``{"error": "KeyError('<name>')"}``, rather than an ``ok`` for
something that did not happen. A handler that raises is answered
``{"error": repr(exc)}`` by kombu's pidbox, as Celery's are.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Callable

from celery.utils.serialization import jsonify
from celery.utils.time import rate as celery_rate
from kombu.utils.encoding import safe_repr

from celerycompat.celery_release import (
    control_replies_are_53,
    control_replies_are_57,
    revoke_stores,
)
from celerycompat.consumer.revoked_stamps import intersecting, parse_cli_headers
from celerycompat.control import worker_commands  # noqa: F401 - registers its commands
from celerycompat.control.registry import COMMANDS, ControlState, command, nok, ok

__all__ = ["COMMANDS", "ControlState", "handlers_for"]

logger = logging.getLogger("celery.worker.control")

DEFAULT_TASK_INFO_ITEMS = ("exchange", "routing_key", "rate_limit")

def handlers_for() -> dict[str, Callable[..., Any]]:
    """Our commands, plus the project's own ``@inspect_command``/``@control_command``.

    Celery's built-in handlers are replaced by ours (they read Celery's
    worker internals); a project's commands are registered in the same
    Panel and keep working with the state attributes they use.
    """
    from celery.worker.control import Panel

    handlers = {name: fun for name, fun in Panel.data.items()
                if getattr(fun, "__module__", "") != "celery.worker.control"}
    handlers.update(COMMANDS)
    if not control_replies_are_53():
        # Stamping came with 5.3: a 5.2 worker answers it as an unknown command.
        handlers.pop("revoke_by_stamped_headers")
    return handlers


# -- liveness and identity ------------------------------------------------------


@command()
def ping(state: ControlState, **kwargs: Any) -> dict[str, str]:
    return ok("pong")


@command()
def clock(state: ControlState, **kwargs: Any) -> dict[str, int]:
    return {"clock": state.app.clock.value}


@command()
def hello(state: ControlState, from_node: str, revoked: Any = None, **kwargs: Any) -> Any:
    """Mingle's sync request from another worker (G4): our revoked ids and clock.

    A peer sends its ids as a list (5.7) or, before 5.7, as its revoked set's
    ``_data`` (``{id: [stamp, id]}``); only the ids are taken, as 5.7 does on
    every release: a stamp is another host's monotonic clock, meaningless here.
    The reply is the installed release's: before 5.7 the ``_data`` mapping.
    """
    if from_node == state.hostname:
        return None
    logger.info("sync with %s", from_node)
    known = state.consumer.revoked
    for task_id in _ids_in(revoked):
        known.add(task_id)
    known.purge()  # expired ids are not passed on
    ids: Any = list(known) if control_replies_are_57() else dict(known._data)
    return {"revoked": ids, "clock": state.app.clock.forward()}


def _ids_in(revoked: Any) -> list[str]:
    """The task ids of a ``hello``'s ``revoked``: a list, a ``{id: stamp}`` mapping,
    one id, or nothing; anything unhashable in it is skipped."""
    if not revoked:
        return []
    if isinstance(revoked, str):
        return [revoked]
    return [task_id for task_id in revoked if isinstance(task_id, str)]


@command("report")
def report(state: ControlState, **kwargs: Any) -> dict[str, str]:
    return ok(state.app.bugreport())


@command("conf", "dump_conf")
def conf(state: ControlState, with_defaults: bool = False, **kwargs: Any) -> Any:
    """Settings changed from the defaults (all with ``with_defaults``), passwords masked."""
    table = state.app.conf.table(with_defaults=with_defaults)
    return jsonify(table, keyfilter=lambda key: isinstance(key, str)
                   and not key.startswith("__"), unknown_type_filter=safe_repr)


# -- tasks ----------------------------------------------------------------------------


@command("active", "dump_active")
def active(state: ControlState, safe: bool = False, **kwargs: Any) -> list[dict]:
    return [request.info(safe=safe) for request in state.consumer.active_requests()]


@command("reserved", "dump_reserved")
def reserved(state: ControlState, **kwargs: Any) -> list[dict]:
    return [request.info() for request in state.consumer.reserved_requests()]


@command("scheduled", "dump_schedule")
def scheduled(state: ControlState, **kwargs: Any) -> list[dict]:
    return [
        {"eta": request.eta.isoformat() if request.eta else None,
         "priority": 6,  # the priority Celery's timer gives every ETA entry
         "request": request.info()}
        for request in state.consumer.scheduled_requests()
    ]


@command("revoke")
def revoke(state: ControlState, task_id: Any, terminate: bool = False, signal: Any = None,
           **kwargs: Any) -> dict[str, str]:
    """Flag ids as revoked (B17-B20): they are discarded (REVOKED) if they arrive or wait here.

    REVOKED is also written at once as the installed release does it
    (`revoke_stores`): 5.7 for every id this worker is not running whose
    stored state is not final or started elsewhere, 5.6 for every id,
    earlier releases for none.
    With ``terminate``, a running task is ended (`Consumer.terminate`:
    prefork sends ``signal`` to its child; gevent and threads end the run,
    which Celery's threads pool cannot) and REVOKED ``terminated`` announced;
    a waiting one is discarded when a slot takes it. The reply names every
    id found here, running or waiting, as Celery's does.
    """
    from celery.platforms import signals as platform_signals

    ids = task_id if isinstance(task_id, (list, tuple, set)) else [task_id]
    task_ids = {str(i) for i in ids if i is not None}
    consumer = state.consumer
    consumer.revoked.update(task_ids)
    consumer.revoked_updated()
    running = {request.id for request in consumer.active_requests()} & task_ids
    succeeded = consumer.results_in_flight() & task_ids
    stores = revoke_stores()
    if stores == "every id":
        _store_revoked(state, task_ids - succeeded, unless_started=False)
    elif stores == "not started":
        _store_revoked(state, task_ids - running - succeeded, unless_started=True)
    if terminate:
        signum = platform_signals.signum(signal or "SIGTERM")
        terminated: list[str] = []
        for request in _requests_by_id(consumer, task_ids):
            if request.id in terminated:
                continue
            terminated.append(request.id)
            logger.info("Terminating %s (%s)", request.id, signum)
            if request.time_start is not None:
                consumer.terminate(request, signum)
        if not terminated:
            return ok("terminate: tasks unknown")
        return ok(f"terminate: {', '.join(terminated)}")
    listed = ", ".join(task_ids)
    logger.info("Tasks flagged as revoked: %s", listed)
    return ok(f"tasks {task_ids if control_replies_are_53() else listed} flagged as revoked")


def _requests_by_id(consumer: Any, task_ids: set[str]) -> list[Any]:
    """Requests known here for ``task_ids``: running, waiting for a slot or an ETA
    (what Celery's ``worker_state.requests`` holds)."""
    after_eta = [request for request in consumer.rate_limited_requests()
                 if request.eta is not None]
    return [request for request in [*consumer.active_requests(),
                                    *consumer.reserved_requests(),
                                    *consumer.scheduled_requests(), *after_eta]
            if request.id in task_ids]


@command("terminate")
def terminate(state: ControlState, signal: Any, task_id: Any, **kwargs: Any) -> dict[str, str]:
    """``celery control terminate SIGNAL ID...``: ``revoke`` with ``terminate``."""
    return revoke(state, task_id, terminate=True, signal=signal)


@command("revoke_by_stamped_headers")
def revoke_by_stamped_headers(state: ControlState, headers: Any, terminate: bool = False,
                              signal: Any = None, **kwargs: Any) -> dict[str, str]:
    """Revoke every task carrying one of the given canvas stamp values (consumer/revoked_stamps.py).

    ``headers`` is ``{name: value or values}`` (``app.control``) or
    ``["name=value", ...]`` (the ``celery control`` CLI). Replies are
    Celery's, texts included. As in Celery, nothing is written to the
    result backend now: a matching task is discarded (REVOKED) when it
    would start, and tasks already running are not looked at unless
    ``terminate`` is set; then the running matches are terminated as by
    ``revoke`` (`Consumer.terminate`), and the reply names the stamp
    values that matched.
    """
    from celery.platforms import signals as platform_signals

    signum = platform_signals.signum(signal or "SIGTERM")  # an unknown signal is an error reply
    headers = parse_cli_headers(headers)
    consumer = state.consumer
    consumer.revoked_stamps.add(headers)
    consumer.revoked_updated()
    if not terminate:
        return ok(f"headers {headers} flagged as revoked, but not terminated")
    matched: defaultdict[str, set] = defaultdict(set)  # Celery's reply shows its repr
    for request in consumer.active_requests():
        found = intersecting(request.message.stamps, headers)
        if not found:
            continue
        for name, values in found.items():
            matched[name].update(values)
        consumer.terminate(request, signum)
    if not matched:
        return ok(f"headers {headers} were not terminated")
    return ok(f"headers {matched} revoked")


def _store_revoked(state: ControlState, task_ids: set[str], *, unless_started: bool) -> None:
    """REVOKED for ``task_ids`` at revoke time (B20): Celery 5.6 writes it for
    every id; 5.7 (``unless_started``) only where the stored state is not
    final nor started elsewhere (`revoke_stores`).

    Skipped for ``rpc://``: a worker has no reply queue of its own to read
    a state from (C19 FLAG: Celery declares one and logs a RuntimeError).
    """
    from celery import states
    from celery.backends.rpc import RPCBackend

    backend = state.app.backend
    if isinstance(backend, RPCBackend):
        return
    for task_id in task_ids:
        try:
            if not unless_started or backend.get_state(task_id) in (
                    states.PENDING, states.RECEIVED, states.RETRY, states.REJECTED):
                backend.mark_as_revoked(task_id, reason="revoked", store_result=True)
        except Exception as exc:
            logger.warning("Failed to mark task %s as revoked in backend: %s", task_id, exc)


@command("revoked", "dump_revoked")
def revoked(state: ControlState, **kwargs: Any) -> list[str]:
    return list(state.consumer.revoked)


@command("query_task")
def query_task(state: ControlState, ids: Any, **kwargs: Any) -> dict[str, Any]:
    wanted = set(ids if isinstance(ids, (list, tuple, set)) else [ids])
    found: dict[str, Any] = {}
    consumer = state.consumer
    # Celery keeps a message that waited for its ETA registered as scheduled
    # while it then waits for a rate-limit token; one without an ETA that
    # waits for a token it does not find at all.
    # Before 5.7 Celery does not register them at all (`control_replies_are_57`).
    after_eta = [request for request in consumer.rate_limited_requests()
                 if request.eta is not None]
    places = [("active", consumer.active_requests()),
              ("reserved", consumer.reserved_requests())]
    if control_replies_are_57():
        places.append(("scheduled", consumer.scheduled_requests() + after_eta))
    for where, requests in places:
        for request in requests:
            if request.id in wanted and request.id not in found:
                found[request.id] = [where, request.info()]
    return found


@command("add_consumer")
def add_consumer(state: ControlState, queue: str, exchange: Any = None,
                 exchange_type: Any = None, routing_key: Any = None,
                 **options: Any) -> dict[str, str]:
    state.consumer.add_task_queue(queue, exchange, exchange_type, routing_key, **options)
    return ok(f"add consumer {queue}")


@command("cancel_consumer")
def cancel_consumer(state: ControlState, queue: str, **kwargs: Any) -> dict[str, str]:
    state.consumer.cancel_task_queue(queue)
    return ok(f"no longer consuming from {queue}")


@command("active_queues")
def active_queues(state: ControlState, **kwargs: Any) -> list[dict]:
    return [dict(queue.as_dict(recurse=True)) for queue in state.consumer.queues]


@command("registered", "dump_tasks")
def registered(state: ControlState, taskinfoitems: Any = None, builtins: bool = False,
               **kwargs: Any) -> list[str]:
    registry = state.app.tasks
    items = [item for item in (taskinfoitems or DEFAULT_TASK_INFO_ITEMS)
             if isinstance(item, str) and not item.startswith("_")]
    names = sorted(name for name in registry if builtins or not name.startswith("celery."))

    def describe(name: str) -> str:
        task = registry[name]
        fields = [f"{item}={getattr(task, item)}" for item in items
                  if getattr(task, item, None) is not None]
        return f"{task.name} [{' '.join(fields)}]" if fields else task.name

    return [describe(name) for name in names]


@command("time_limit")
def time_limit(state: ControlState, task_name: Any = None, hard: Any = None, soft: Any = None,
               **kwargs: Any) -> dict[str, str]:
    """Set a task type's limits; the pools read them when a task starts (B24)."""
    try:
        task = state.app.tasks[task_name]
    except KeyError:
        logger.error("Change time limit attempt for unknown task %s", task_name, exc_info=True)
        return nok("unknown task")
    task.soft_time_limit = soft
    task.time_limit = hard
    logger.info("New time limits for tasks of type %s: soft=%s hard=%s", task_name, soft, hard)
    return ok("time limits set successfully")


@command("rate_limit")
def rate_limit(state: ControlState, task_name: Any, rate_limit: Any,
               **kwargs: Any) -> dict[str, str]:
    """Set a task type's ``rate_limit``; the consumer re-reads every type's limit.

    Replies and log lines are Celery's, including its quirks: the rate is
    validated by Celery's own parser, so an unknown unit (``"10/x"``) is not
    a ValueError but a KeyError, which reaches the client as the generic
    error reply; ``"0"`` is "set" (it means no limit), while ``""`` or
    None is "disabled". Unlike Celery, messages already waiting for a token
    follow the new rate (see `Consumer.reset_rate_limits`).
    """
    try:
        celery_rate(rate_limit)
    except ValueError as exc:
        return nok(f"Invalid rate limit string: {exc!r}")
    try:
        state.app.tasks[task_name].rate_limit = rate_limit
    except KeyError:
        logger.error("Rate limit attempt for unknown task %s", task_name, exc_info=True)
        return nok("unknown task")
    state.consumer.reset_rate_limits()
    if not rate_limit:
        logger.info("Rate limits disabled for tasks of type %s", task_name)
        return ok("rate limit disabled successfully")
    logger.info("New rate limit for tasks of type %s: %s.", task_name, rate_limit)
    return ok("new rate limit set successfully")
