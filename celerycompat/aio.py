"""The public face of ``async def`` tasks (docs/async-tasks.md).

A project that keeps clients or pools on the worker's event loop opens and
closes them here::

    from celerycompat import aio

    @aio.on_loop_start
    async def open_client(loop):
        global http
        http = httpx.AsyncClient()

    @aio.on_loop_stop
    async def close_client(loop):
        await http.aclose()

Each loop (one per slot thread of ``-P threads``, one per prefork child, the
main thread's on ``-P solo``) awaits the start hooks before its first task
and the stop hooks when its thread or process ends. A Celery worker importing
the same project never calls them.
"""

from celerycompat.execution.coroutines import async_task_names, on_loop_start, on_loop_stop

__all__ = ["async_task_names", "on_loop_start", "on_loop_stop"]
