"""``async def`` tasks: the coroutine is awaited on an event loop that outlives it.

Celery's worker calls a task's ``run`` and stores what comes back; for an
``async def`` task that is an un-awaited coroutine, and the task fails
encoding it (Celery #3884, #6552). ccworker awaits it instead:

* :func:`adapt` (at app load, for every registered task) puts a plain
  function in place of the coroutine function: ``task.run``, or
  ``task._orig_run`` where Celery's ``autoretry_for`` wrapper already sits
  on ``run`` (so autoretry, ``self.retry()``, custom ``__call__`` and the
  runner's whole trace see an ordinary call that returns or raises).
* The function runs the coroutine to its end on **this thread's loop**
  (:func:`run`): made on first use, kept for the thread's life, so clients
  and connection pools the project keeps on the loop are reused from task to
  task. Each slot thread of ``-P threads``, the main thread of ``-P solo``
  and of each prefork child has one. Between tasks the loop does not turn.
  Because the coroutine runs on the slot's own thread, ``self.request``,
  ``current_task`` and everything else Celery keeps per thread are the run's.
* Time limits and ``revoke(terminate=True)`` reach a coroutine through
  :func:`deliver`, the seam every pool calls before raising in a thread:
  a soft limit throws ``SoftTimeLimitExceeded`` into the coroutine at the
  await it is suspended in (asyncio's own cancellation carries it there,
  then is withdrawn, as ``asyncio.timeout`` does); a hard limit or terminate
  cancels the coroutine and the run leaves with the pool's unwind exception.
  A coroutine that blocks its loop in synchronous code sees neither until it
  next awaits (the threads pool still frees the slot at the hard limit).
* :func:`on_loop_start` / :func:`on_loop_stop` register coroutine functions
  run on each loop when it is made and when its thread ends, for loop-bound
  resources (``celerycompat.aio`` is the public name).

gevent and eventlet run every slot in one OS thread, where asyncio allows one
running loop: an ``async def`` task fails there with a message naming the
pools that run it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import threading
from contextvars import ContextVar
from typing import Any, Awaitable, Callable, Coroutine, Generator, Union

try:  # -P asyncio's task greenlets (greenlet comes with the asyncio/gevent extras)
    from greenlet import getcurrent as _getcurrent
except ImportError:  # pragma: no cover - without greenlet there is no -P asyncio
    _getcurrent = None

logger = logging.getLogger("celery.worker")

#: Marks the plain function :func:`adapt` put in place of a coroutine function.
ADAPTED = "__ccworker_awaits__"

#: True while a task's coroutine, or anything it calls, runs (in the
#: asyncio Task awaiting it, or a ``-P asyncio`` greenlet's steps): an
#: adapted task called directly there (``other(x)``, ``other.run(x)``)
#: returns its coroutine, as the ``async def`` function would, for the
#: caller to await; called anywhere else it is awaited to its end.
in_coroutine: ContextVar[bool] = ContextVar("ccworker_in_coroutine", default=False)

class CancelledError(Exception):
    """Raised by an async task whose coroutine ended in an
    ``asyncio.CancelledError`` that no time limit, terminate or shutdown
    asked for (it awaited a task or future that was cancelled, say).

    asyncio's is a ``BaseException``, which Celery's trace lets through: the
    task would end with nothing stored and its client waiting for ever.
    This one fails the task as any exception does (FAILURE, ``exc_type``
    ``CancelledError``), asyncio's as its cause.
    """


def cancelled_unasked(cause: BaseException) -> CancelledError:
    """The task's exception for a cancellation nobody asked for (`CancelledError`)."""
    error = CancelledError("the coroutine was cancelled, and no time limit, "
                           "terminate or shutdown asked for it")
    error.__cause__ = cause
    return error


#: An exception class (instantiated without arguments) or instance.
Interruption = Union[type[BaseException], BaseException]

LoopHook = Callable[[asyncio.AbstractEventLoop], Awaitable[Any]]
_start_hooks: list[LoopHook] = []
_stop_hooks: list[LoopHook] = []


def on_loop_start(hook: LoopHook) -> LoopHook:
    """Register ``async def hook(loop)``, awaited on each worker loop before its
    first task (open an HTTP client, a database pool). Usable as a decorator."""
    _start_hooks.append(hook)
    return hook


def on_loop_stop(hook: LoopHook) -> LoopHook:
    """Register ``async def hook(loop)``, awaited on each worker loop when its
    thread or process ends (close what :func:`on_loop_start` opened)."""
    _stop_hooks.append(hook)
    return hook


def start_hooks() -> list[LoopHook]:
    return list(_start_hooks)


def stop_hooks() -> list[LoopHook]:
    return list(_stop_hooks)


# -- which tasks are coroutines ---------------------------------------------------


def coroutine_function(task: Any) -> Callable[..., Coroutine] | None:
    """The ``async def`` function behind ``task``, or None for a synchronous task."""
    for attr in ("_orig_run", "run"):
        fun = getattr(task, attr, None)
        if fun is not None and inspect.iscoroutinefunction(fun):
            return fun
        if getattr(fun, ADAPTED, None) is not None:
            return getattr(fun, ADAPTED)
    return None


def async_task_names(app: Any) -> list[str]:
    """The names of ``app``'s tasks defined with ``async def``, sorted."""
    return sorted(name for name, task in app.tasks.items() if coroutine_function(task))


def adapt(task: Any) -> bool:
    """Make an ``async def`` task callable as a synchronous one (idempotent).

    Returns whether ``task`` is an ``async def`` task.
    """
    attr = "_orig_run" if inspect.iscoroutinefunction(getattr(task, "_orig_run", None)) \
        else "run"
    fun = getattr(task, attr, None)
    if getattr(fun, ADAPTED, None) is not None:
        return True
    if fun is None or not inspect.iscoroutinefunction(fun):
        return False

    def awaited(*args: Any, **kwargs: Any) -> Any:
        coro = fun(*args, **kwargs)
        return coro if in_coroutine.get() else run(coro)

    awaited.__name__ = getattr(fun, "__name__", "run")
    awaited.__qualname__ = getattr(fun, "__qualname__", awaited.__name__)
    awaited.__doc__ = getattr(fun, "__doc__", None)
    awaited.__wrapped__ = fun  # type: ignore[attr-defined]
    setattr(awaited, ADAPTED, fun)
    # On the instance: the task's class (and a Celery worker importing the
    # same project) keeps the coroutine function.
    setattr(task, attr, awaited)
    return True


def adapt_all(app: Any) -> list[str]:
    """:func:`adapt` every task ``app`` has registered; returns the async ones."""
    return sorted(name for name, task in app.tasks.items() if adapt(task))


# -- one loop per thread ----------------------------------------------------------


class _Run:
    """The coroutine run in progress on one thread's loop."""

    __slots__ = ("loop", "task", "throw", "unwind")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.task: asyncio.Task | None = None
        #: What to throw into the coroutine at its await (soft limit).
        self.throw: Interruption | None = None
        #: What the run leaves with once cancelled (hard limit, terminate).
        self.unwind: Interruption | None = None

    def interrupt(self, exc_type: Interruption, cancel: bool) -> None:
        """On the loop: carry ``exc_type`` to the coroutine (see :func:`deliver`)."""
        task = self.task
        if task is None or task.done():
            return  # ended meanwhile: the pool's own phase check decides
        if cancel:
            self.unwind = exc_type
        elif self.unwind is None:
            self.throw = exc_type
        task.cancel()


class _Interruptible:
    """Awaits a coroutine, turning a cancellation the run asked for into the
    exception it stands for, thrown into the coroutine where it waits."""

    __slots__ = ("coro", "state")

    def __init__(self, coro: Coroutine, state: _Run) -> None:
        self.coro = coro
        self.state = state

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, state = self.coro, self.state
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as stop:
                return stop.value
            value = error = None
            try:
                value = yield step
            except asyncio.CancelledError as cancelled:
                if state.throw is not None and state.unwind is None:
                    exc_type, state.throw = state.throw, None
                    withdraw_cancellation()
                    error = _instance(exc_type)
                else:
                    error = cancelled
            except BaseException as exc:  # thrown in by the loop: pass it on
                error = exc


class _ThreadLoop(threading.local):
    loop: asyncio.AbstractEventLoop | None = None
    pid: int = 0


_local = _ThreadLoop()
#: thread ident -> the run in progress there (read by other threads in `deliver`).
_runs: dict[int, _Run] = {}


def _green_runtime() -> str | None:
    """``gevent``/``eventlet`` when the worker's threads are green ones."""
    for name in ("gevent", "eventlet"):
        module = sys.modules.get(f"{name}.monkey" if name == "gevent" else "eventlet.patcher")
        if module is None:
            continue
        patched = (module.is_module_patched("threading") if name == "gevent"
                   else module.is_monkey_patched("thread"))
        if patched:
            return name
    return None


def thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's worker loop, made (and its start hooks awaited) on first use."""
    loop = _local.loop
    if loop is not None and _local.pid == os.getpid() and not loop.is_closed():
        return loop
    green = _green_runtime()
    if green is not None:
        raise RuntimeError(
            f"async def tasks do not run on the {green} pool (one OS thread, one running "
            "event loop): use -P threads, prefork or solo (docs/async-tasks.md)")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    _local.loop, _local.pid = loop, os.getpid()
    for hook in list(_start_hooks):
        loop.run_until_complete(hook(loop))
    return loop


def close_thread_loop() -> None:
    """Await the stop hooks on this thread's loop, if it has one, and close it."""
    loop, _local.loop = _local.loop, None
    if loop is None or loop.is_closed() or _local.pid != os.getpid():
        return
    try:
        for hook in list(_stop_hooks):
            try:
                loop.run_until_complete(hook(loop))
            except Exception:
                logger.exception("An on_loop_stop hook failed: %r", hook)
        loop.run_until_complete(loop.shutdown_asyncgens())
    except Exception:
        logger.exception("Closing the event loop of async def tasks failed")
    finally:
        loop.close()


def run(coro: Coroutine) -> Any:
    """Await ``coro`` on this thread's loop; its result or its exception.

    In a task greenlet of ``-P asyncio`` (pools/asyncio_pool.py) the pool's
    loop awaits it instead, stepping it in that greenlet.
    """
    awaiting = getattr(_getcurrent(), "await_coroutine", None) if _getcurrent else None
    if awaiting is not None:
        return awaiting(coro)
    try:
        loop = thread_loop()
    except BaseException:
        coro.close()
        raise
    state = _Run(loop)
    ident = threading.get_ident()
    state.task = loop.create_task(_await(coro, state))
    _runs[ident] = state
    try:
        return loop.run_until_complete(state.task)
    except asyncio.CancelledError as cancelled:
        coro.close()  # cancelled before its first step: never started
        if state.unwind is not None:
            raise _instance(state.unwind) from None
        if state.throw is not None:
            raise _instance(state.throw) from None
        raise cancelled_unasked(cancelled) from None
    finally:
        _runs.pop(ident, None)


def withdraw_cancellation() -> None:
    """Withdraw the cancellation that stood for another exception (Python
    3.11 counts them; 3.10, which Celery 5.2 runs on, does not)."""
    task = asyncio.current_task()
    uncancel = getattr(task, "uncancel", None)
    if uncancel is not None:
        uncancel()


def _instance(exc: Interruption) -> BaseException:
    return exc if isinstance(exc, BaseException) else exc()


async def _await(coro: Coroutine, state: _Run) -> Any:
    in_coroutine.set(True)  # in this Task's own context only
    return await _Interruptible(coro, state)


def deliver(ident: int, exc_type: Interruption, *, cancel: bool) -> bool:
    """Carry a pool's interruption to the coroutine thread ``ident`` is awaiting.

    ``exc_type`` is an exception class or instance. ``cancel=False`` (soft
    limit): it is thrown into the coroutine at its await. ``cancel=True``
    (hard limit, terminate): the coroutine is cancelled, so its ``finally``
    and ``async with`` exits run as asyncio code expects, and the run then
    raises it. Returns False when the
    thread is not awaiting a coroutine (the pool raises in the thread as for
    any task). Safe from any thread and from a signal handler.
    """
    state = _runs.get(ident)
    if state is None:
        return False
    try:
        state.loop.call_soon_threadsafe(state.interrupt, exc_type, cancel)
    except RuntimeError:  # the loop was closed meanwhile
        return False
    return True
