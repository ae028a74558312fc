"""The project's own Request class: the Celery docs' example, plus a record of
every hook the worker calls (``ccit_recorder``), with what it was given.

Each hook records, then calls Celery's (``super()``), as real projects do;
``on_success`` is overridden too, to show it is not called for a success
(Celery's ``create_request_cls`` puts its own over it).
"""

import logging
import os

from celery.worker.request import Request

from ccit_recorder import record

logger = logging.getLogger("proj_requests")


def _exc_name(exc_info):
    exc = exc_info.exception
    inner = getattr(exc, "exc", None)  # billiard's ExceptionWithTraceback
    if type(exc).__name__ == "ExceptionWithTraceback" and inner is not None:
        exc = inner
    return type(exc).__name__


class TrackedRequest(Request):
    def on_accepted(self, pid, time_accepted):
        record("request.on_accepted", task=self.task.name, child=pid != os.getpid(),
               pid=isinstance(pid, int), args=self.args)
        super().on_accepted(pid, time_accepted)

    def on_success(self, failed__retval__runtime, **kwargs):
        failed = failed__retval__runtime[0]
        record("request.on_success", task=self.task.name, failed=bool(failed))
        return super().on_success(failed__retval__runtime, **kwargs)

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        record("request.on_failure", task=self.task.name, exception=_exc_name(exc_info),
               return_ok=return_ok, send_failed_event=send_failed_event)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        logger.warning("Failure detected for task %s", self.task.name)

    def on_retry(self, exc_info):
        record("request.on_retry", task=self.task.name,
               exception=type(exc_info.exception.exc).__name__)
        super().on_retry(exc_info)

    def on_timeout(self, soft, timeout):
        record("request.on_timeout", task=self.task.name, soft=soft, timeout=timeout)
        super().on_timeout(soft, timeout)
        if not soft:
            logger.warning("A hard timeout was enforced for task %s", self.task.name)

    def acknowledge(self):
        record("request.acknowledge", task=self.task.name)
        super().acknowledge()

    def reject(self, requeue=False):
        record("request.reject", task=self.task.name, requeue=requeue)
        super().reject(requeue=requeue)
