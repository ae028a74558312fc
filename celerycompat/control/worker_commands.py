"""The control commands about the worker itself: ``stats``, ``shutdown``,
the pool (``pool_grow``/``pool_shrink``/``pool_restart``, ``autoscale``),
events (``enable_events``, ``disable_events``, ``heartbeat``), debugging
(``memsample``, ``memdump``, ``objgraph``) and gossip's ``election``.

Replies have the installed Celery's shapes (``celery_release``), as the
task commands in control/commands.py do; control/registry.py says how a
command is declared.
"""

from __future__ import annotations

import io
import logging
import os
import resource
import sys
import tempfile
import time
from typing import Any

from celery.exceptions import WorkerShutdown
from celery.platforms import EX_OK

from celerycompat.celery_release import control_replies_are_53, control_replies_are_57
from celerycompat.control.registry import ControlState, command, nok, ok

logger = logging.getLogger("celery.worker.control")


# -- worker ---------------------------------------------------------------------------


@command("stats")
def stats(state: ControlState, **kwargs: Any) -> dict[str, Any]:
    """Celery's ``stats`` layout (F10), with our pool's facts."""
    consumer = state.consumer
    autoscaler = consumer.autoscaler
    steps = consumer.project_steps
    return {
        "total": dict(consumer.total_count),
        "pid": os.getpid(),
        "clock": str(state.app.clock.value),
        "uptime": int(time.monotonic() - state.started),
        "pool": _pool_info(consumer.pool),
        # Only with --autoscale, after ``pool`` (Celery's Autoscaler step).
        **({"autoscaler": autoscaler.info()} if autoscaler is not None else {}),
        # What the project's worker steps' ``info`` returns (Celery merges
        # each blueprint's step infos in), then its consumer steps' below.
        **(steps.worker_info() if steps is not None else {}),
        "broker": consumer.broker_info(),
        "prefetch_count": consumer.prefetch_count,
        **(steps.consumer_info() if steps is not None else {}),
        "rusage": rusage(),
    }


def _pool_info(pool: Any) -> dict[str, Any]:
    info = pool.info()
    if not control_replies_are_53():
        info.pop("implementation", None)  # Celery 5.2's pools do not name themselves
    return info


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


# -- pool -----------------------------------------------------------------------------


def _resize(pool: Any, how: str, n: Any) -> None:
    """``pool.grow(n)``/``pool.shrink(n)``; a pool that cannot resize (solo) fails
    with the AttributeError Celery's pools without the method raise."""
    method = getattr(pool, how, None)
    if method is None:
        raise AttributeError(f"'TaskPool' object has no attribute '{how}'")
    method(int(n))


@command("pool_grow")
def pool_grow(state: ControlState, n: Any = 1, **kwargs: Any) -> dict[str, str]:
    """``n`` more slots (prefork: processes; threads: threads; gevent: greenlets).

    Celery's threads pool cannot grow (an AttributeError reply); ours can.
    """
    consumer = state.consumer
    if consumer.autoscaler is not None:
        return nok("pool_grow is not supported with autoscale. Adjust autoscale range instead.")
    _resize(consumer.pool, "grow", n)
    consumer.pool_resized()
    return ok("pool will grow")


@command("pool_shrink")
def pool_shrink(state: ControlState, n: Any = 1, **kwargs: Any) -> dict[str, str]:
    """``n`` fewer slots; prefork stops idle processes only (billiard's ValueError
    when too few are idle, after stopping those that are)."""
    consumer = state.consumer
    if consumer.autoscaler is not None:
        return nok("pool_shrink is not supported with autoscale. "
                   "Adjust autoscale range instead.")
    try:
        _resize(consumer.pool, "shrink", n)
    finally:
        # A prefork pool stops the idle processes it can even when it then
        # says not enough were idle: the prefetch count follows either way.
        consumer.pool_resized()
    return ok("pool will shrink")


@command("pool_restart")
def pool_restart(state: ControlState, modules: Any = None, reload: bool = False,
                 reloader: Any = None, **kwargs: Any) -> dict[str, str]:
    """``worker_pool_restarts`` only: (re)import task modules, then new pool processes.

    As Celery's ``WorkController.reload``: each of ``modules`` (default: the
    app's task modules) not imported yet is imported; with ``reload``, those
    imported already are reloaded (``reloader(module)``, default
    ``importlib.reload``). Rate limits are read again, and a prefork pool's
    children are replaced, once idle, by forks of this process, which has
    the new code. Other pools run tasks in this process: the imports are all.
    """
    if not state.app.conf.worker_pool_restarts:
        raise ValueError("Pool restarts not enabled")
    from celery.utils.imports import reload_from_cwd

    loader = state.app.loader
    names = loader.task_modules if modules is None else (modules or ())
    for name in set(names):
        if name not in sys.modules:
            logger.debug("importing module %s", name)
            loader.import_from_cwd(name)
        elif reload:
            logger.debug("reloading module %s", name)
            reload_from_cwd(sys.modules[name], reloader)
    consumer = state.consumer
    consumer.reset_rate_limits()
    try:
        consumer.pool.restart()
    except NotImplementedError:
        pass
    return ok("reload started")


@command("autoscale")
def autoscale(state: ControlState, max: Any = None, min: Any = None) -> dict[str, str]:
    """New autoscale bounds (``celery control autoscale MAX [MIN]``).

    No ``**kwargs``: Celery's handler takes none either, so an unknown
    argument is a TypeError reply on both.
    """
    autoscaler = state.consumer.autoscaler
    if autoscaler is None:
        raise ValueError("Autoscale not enabled")
    max_, min_ = autoscaler.update(max, min)
    return ok(f"autoscale now max={max_} min={min_}")


# -- events ---------------------------------------------------------------------------


def _dispatcher(state: ControlState, needs: str) -> Any:
    """The event dispatcher, or None when the worker has none. Before 5.7 a
    command then fails as Celery's does, reaching for ``needs`` on None."""
    dispatcher = state.consumer.dispatcher
    if dispatcher is None and not control_replies_are_57():
        raise AttributeError(f"'NoneType' object has no attribute '{needs}'")
    return dispatcher


@command("enable_events")
def enable_events(state: ControlState, **kwargs: Any) -> dict[str, str]:
    dispatcher = _dispatcher(state, "groups")
    if dispatcher is None:
        return nok("event dispatcher unavailable")
    if dispatcher.enable_task_events():
        logger.info("Events of group {task} enabled by remote.")
        return ok("task events enabled")
    return ok("task events already enabled")


@command("disable_events")
def disable_events(state: ControlState, **kwargs: Any) -> dict[str, str]:
    dispatcher = _dispatcher(state, "groups")
    if dispatcher is None:
        return nok("event dispatcher unavailable")
    if dispatcher.disable_task_events():
        logger.info("Events of group {task} disabled by remote.")
        return ok("task events disabled")
    return ok("task events already disabled")


@command("heartbeat")
def heartbeat(state: ControlState, **kwargs: Any) -> None:
    """One worker-heartbeat now, as Celery sends it on request (E6: ``freq`` 5)."""
    dispatcher = _dispatcher(state, "send")
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
    """Start an election among the gossiping nodes (control/gossip.py).

    Without gossip Celery 5.7 replies with an AttributeError from its idle
    gossip step; ccworker takes part in nothing and replies ``null``.
    """
    gossip = state.consumer.gossip
    if gossip is not None and gossip.running:
        gossip.election(id, topic, action)
    return None
