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
    def _record(self, event, **fields):
        # ``run``: the message's retries count, which tells a retried task's
        # runs apart (they share the task id).
        record(event, task=self.task.name, run=self.request_dict.get("retries"), **fields)

    def on_accepted(self, pid, time_accepted):
        self._record("request.on_accepted", child=pid != os.getpid(),
                     pid=isinstance(pid, int), args=self.args)
        super().on_accepted(pid, time_accepted)

    def on_success(self, failed__retval__runtime, **kwargs):
        failed = failed__retval__runtime[0]
        self._record("request.on_success", failed=bool(failed))
        return super().on_success(failed__retval__runtime, **kwargs)

    def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
        self._record("request.on_failure", exception=_exc_name(exc_info),
                     return_ok=return_ok, send_failed_event=send_failed_event)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)
        logger.warning("Failure detected for task %s", self.task.name)

    def on_retry(self, exc_info):
        self._record("request.on_retry", exception=type(exc_info.exception.exc).__name__)
        super().on_retry(exc_info)

    def on_timeout(self, soft, timeout):
        self._record("request.on_timeout", soft=soft, timeout=timeout)
        super().on_timeout(soft, timeout)
        if not soft:
            logger.warning("A hard timeout was enforced for task %s", self.task.name)

    def acknowledge(self):
        self._record("request.acknowledge")
        super().acknowledge()

    def reject(self, requeue=False):
        self._record("request.reject", requeue=requeue)
        super().reject(requeue=requeue)
