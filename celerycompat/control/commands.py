"""The inspect and control commands a ccworker answers (wire contract F8-F11).

Each command is a function ``(state, **arguments) -> reply`` with the name
and reply shape of the Celery 5.7 command, so ``celery inspect``, ``celery
control``, ``celery status`` and Flower parse the replies as they parse a
Celery worker's. ``state`` is a `ControlState`, with the attributes
(``app``, ``hostname``, ``consumer``) that custom commands registered with
``@inspect_command``/``@control_command`` read from Celery's own state.

Commands that need machinery ccworker does not have yet (terminate, rate
limits, pool resizing, adding consumers...) are not registered: a client
asking for one gets Celery's answer to an unknown command,
``{"error": "KeyError('<name>')"}``, rather than an ``ok`` for something
that did not happen.
"""

from __future__ import annotations

import io
import logging
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from celery.exceptions import WorkerShutdown
from celery.platforms import EX_OK
from celery.utils.serialization import jsonify
from kombu.utils.encoding import safe_repr

logger = logging.getLogger("celery.worker.control")

DEFAULT_TASK_INFO_ITEMS = ("exchange", "routing_key", "rate_limit")

#: name -> handler; aliases are separate entries, as in Celery's Panel.
COMMANDS: dict[str, Callable[..., Any]] = {}


def command(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fun: Callable[..., Any]) -> Callable[..., Any]:
        for name in names or (fun.__name__,):
            COMMANDS[name] = fun
        return fun
    return register


def ok(value: Any) -> dict[str, Any]:
    return {"ok": value}


def nok(value: Any) -> dict[str, Any]:
    return {"error": value}


@dataclass
class ControlState:
    """What command handlers see as ``state``."""

    app: Any
    hostname: str
    consumer: Any
    started: float = field(default_factory=time.monotonic)
    tset: Callable[[Any], set] = set


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
    """Mingle's sync request from another worker (G4): our revoked ids and clock."""
    if from_node == state.hostname:
        return None
    logger.info("sync with %s", from_node)
    known = state.consumer.revoked
    if revoked:
        for task_id in revoked if isinstance(revoked, (list, tuple)) else [revoked]:
            known.add(task_id)
    known.purge()  # expired ids are not passed on
    return {"revoked": list(known), "clock": state.app.clock.forward()}


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

    As Celery 5.7, REVOKED is also written at once for every id this worker
    is not running whose stored state is not final or started elsewhere.
    Terminating a *running* task is not supported yet: rather than answer
    "ok", the reply is an error naming the tasks that keep running.
    """
    ids = task_id if isinstance(task_id, (list, tuple, set)) else [task_id]
    task_ids = {str(i) for i in ids if i is not None}
    consumer = state.consumer
    consumer.revoked.update(task_ids)
    running = {request.id for request in consumer.active_requests()} & task_ids
    _store_revoked(state, task_ids - running)
    if terminate:
        if running:
            return nok(f"terminate is not supported by ccworker yet: {', '.join(sorted(running))} "
                       "keep running (the other ids are revoked)")
        waiting = {request.id for request in consumer.reserved_requests()
                   + consumer.scheduled_requests()} & task_ids
        if not waiting:
            return ok("terminate: tasks unknown")
        return ok(f"terminate: {', '.join(waiting)}")
    logger.info("Tasks flagged as revoked: %s", ", ".join(task_ids))
    return ok(f"tasks {task_ids} flagged as revoked")


def _store_revoked(state: ControlState, task_ids: set[str]) -> None:
    """Celery 5.7 writes REVOKED for ids not final nor started elsewhere (B20).

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
            if backend.get_state(task_id) in (states.PENDING, states.RECEIVED, states.RETRY,
                                              states.REJECTED):
                backend.mark_as_revoked(task_id, reason="revoked", store_result=True)
        except Exception as exc:
            logger.warning("Failed to mark task %s as revoked in backend: %s", task_id, exc)


@command("revoked", "dump_revoked")
def revoked(state: ControlState, **kwargs: Any) -> list[str]:
    return list(getattr(state.consumer, "revoked", ()) or ())


@command("query_task")
def query_task(state: ControlState, ids: Any, **kwargs: Any) -> dict[str, Any]:
    wanted = set(ids if isinstance(ids, (list, tuple, set)) else [ids])
    found: dict[str, Any] = {}
    consumer = state.consumer
    for where, requests in (("active", consumer.active_requests()),
                            ("reserved", consumer.reserved_requests()),
                            ("scheduled", consumer.scheduled_requests())):
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


# -- worker ---------------------------------------------------------------------------


@command("stats")
def stats(state: ControlState, **kwargs: Any) -> dict[str, Any]:
    """Celery's ``stats`` layout (F10), with our pool's facts."""
    consumer = state.consumer
    return {
        "total": dict(consumer.total_count),
        "pid": os.getpid(),
        "clock": str(state.app.clock.value),
        "uptime": int(time.monotonic() - state.started),
        "pool": consumer.pool.info(),
        "broker": consumer.broker_info(),
        "prefetch_count": consumer.prefetch_count,
        "rusage": rusage(),
    }


def rusage() -> dict[str, Any]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "utime": usage.ru_utime, "stime": usage.ru_stime, "maxrss": usage.ru_maxrss,
        "ixrss": usage.ru_ixrss, "idrss": usage.ru_idrss, "isrss": usage.ru_isrss,
        "minflt": usage.ru_minflt, "majflt": usage.ru_majflt, "nswap": usage.ru_nswap,
        "inblock": usage.ru_inblock, "oublock": usage.ru_oublock,
        "msgsnd": usage.ru_msgsnd, "msgrcv": usage.ru_msgrcv,
        "nsignals": usage.ru_nsignals, "nvcsw": usage.ru_nvcsw, "nivcsw": usage.ru_nivcsw,
    }


@command("shutdown")
def shutdown(state: ControlState, msg: str = "Got shutdown from remote", **kwargs: Any) -> None:
    logger.warning(msg)
    raise WorkerShutdown(EX_OK)


# -- events ---------------------------------------------------------------------------


def _dispatcher(state: ControlState) -> Any:
    return getattr(state.consumer, "dispatcher", None)


@command("enable_events")
def enable_events(state: ControlState, **kwargs: Any) -> dict[str, str]:
    dispatcher = _dispatcher(state)
    if dispatcher is None:
        return nok("event dispatcher unavailable")
    if dispatcher.enable_task_events():
        logger.info("Events of group {task} enabled by remote.")
        return ok("task events enabled")
    return ok("task events already enabled")


@command("disable_events")
def disable_events(state: ControlState, **kwargs: Any) -> dict[str, str]:
    dispatcher = _dispatcher(state)
    if dispatcher is None:
        return nok("event dispatcher unavailable")
    if dispatcher.disable_task_events():
        logger.info("Events of group {task} disabled by remote.")
        return ok("task events disabled")
    return ok("task events already disabled")


@command("heartbeat")
def heartbeat(state: ControlState, **kwargs: Any) -> None:
    """One worker-heartbeat now, as Celery sends it on request (E6: ``freq`` 5)."""
    dispatcher = _dispatcher(state)
    if dispatcher is not None:
        from celerycompat.protocol.events import software_info

        dispatcher.send("worker-heartbeat", freq=5, **software_info())


# -- debugging ------------------------------------------------------------------------


@command("memsample")
def memsample(state: ControlState, **kwargs: Any) -> Any:
    from celery.utils.debug import sample_mem

    return sample_mem()


@command("memdump")
def memdump(state: ControlState, samples: int = 10, **kwargs: Any) -> str:
    from celery.utils import debug

    out = io.StringIO()
    debug.memdump(file=out)
    return out.getvalue()


@command("objgraph")
def objgraph(state: ControlState, num: int = 200, max_depth: int = 10,
             type: str = "Request", **kwargs: Any) -> dict[str, str]:
    try:
        import objgraph as _objgraph
    except ImportError:
        raise ImportError("Requires the objgraph library") from None
    with tempfile.NamedTemporaryFile(prefix="cobjg", suffix=".png", delete=False) as fh:
        objects = _objgraph.by_type(type)[:num]
        _objgraph.show_backrefs(objects, max_depth=max_depth,
                                highlight=lambda v: v in objects, filename=fh.name)
        return {"filename": fh.name}


@command("election")
def election(state: ControlState, id: Any = None, topic: Any = None, action: Any = None,
             **kwargs: Any) -> None:
    """Elections need gossip, which ccworker does not run yet: take part in none."""
    return None
