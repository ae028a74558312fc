"""Tasks of ``proj_wire``: each one makes one wire behaviour visible.

Values a task cannot return through every result serializer (what it saw,
what time it ran) are reduced inside the task to booleans and type names, so
the two workers' results compare exactly while still saying what happened.
"""

import datetime
import decimal
import time
import uuid

import redis
from celery.exceptions import Ignore, Reject

from ccit_recorder import record

from .celery import app


class WireError(Exception):
    """A project exception: the client re-imports it from ``exc_module``."""


# --------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------


@app.task
def noop():
    """The harness's sentinel (``Observer.settle``)."""
    return "done"


@app.task
def add(x, y):
    return x + y


@app.task
def tsum(values):
    return sum(values)


@app.task
def echo(*args, **kwargs):
    return [list(args), kwargs]


@app.task
def typed(*args, **kwargs):
    """The arguments as the task received them, with their Python types:
    a serializer that decodes ``bytes`` as ``str`` or a list as a tuple shows
    up here even where the result serializer would hide it."""
    return {
        "args": [[type(a).__name__, a] for a in args],
        "kwargs": {k: [type(v).__name__, v] for k, v in sorted(kwargs.items())},
    }


@app.task
def make_json_types():
    """Kombu JSON envelope types created inside the task, so it is the
    worker's result encoder (not an echo of the client's) that writes them."""
    return {
        "datetime": datetime.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=datetime.timezone.utc),
        "naive": datetime.datetime(2031, 5, 6, 7, 8, 9),
        "date": datetime.date(2031, 5, 6),
        "time": datetime.time(7, 8, 9),
        "decimal": decimal.Decimal("-12.340"),
        "uuid": uuid.UUID("87654321-4321-8765-4321-876543218765"),
        "bytes": b"utf8 bytes \xc3\xa9",
        "binary": b"\x00\xff\xfe binary",
    }


@app.task
def make_pickle_types():
    """Values only the pickle result serializer keeps as they are."""
    return {"set": {3, 1, 2}, "tuple": (1, (2, "x")), "frozenset": frozenset({"a"}),
            "complex": 1 + 2j, "bytes": b"\x00\xff"}


@app.task
def fail(x=None):
    raise WireError("boom", x)


# --------------------------------------------------------------------------
# What the worker tells the task
# --------------------------------------------------------------------------

_REQUEST_FIELDS = (
    "id", "task", "args", "kwargs", "retries", "root_id", "parent_id", "group",
    "group_index", "is_eager", "called_directly", "origin", "ignore_result",
    "timelimit", "time_limit", "soft_time_limit", "shadow", "expires", "lang",
    "callbacks", "errbacks", "chain", "chord", "reply_to", "correlation_id",
    "headers", "hostname", "utc",
)


@app.task(bind=True)
def request_fields(self, *args, **kwargs):
    """The request context with everything run-dependent reduced: ``eta`` to
    whether it is set, ``delivery_info`` to the keys that name the route."""
    req = self.request
    out = {f: getattr(req, f, "<missing>") for f in _REQUEST_FIELDS}
    out["eta_set"] = getattr(req, "eta", None) is not None
    info = getattr(req, "delivery_info", None) or {}
    out["delivery_info"] = {k: info.get(k, "<missing>")
                            for k in ("exchange", "routing_key", "priority", "redelivered")}
    return _jsonable(out)


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def _as_utc(value):
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=datetime.timezone.utc)
    return value


@app.task(bind=True)
def when(self):
    """Whether the task started before its ETA (it must not), judged inside
    the task against the ETA it was given."""
    now = datetime.datetime.now(datetime.timezone.utc)
    eta = _as_utc(getattr(self.request, "eta", None))
    return {"has_eta": eta is not None, "not_early": eta is None or now >= eta}


@app.task(bind=True)
def eta_lead(self):
    """How many milliseconds before its ETA the task started (0: not early),
    judged inside the task against the ETA it was given."""
    now = datetime.datetime.now(datetime.timezone.utc)
    eta = _as_utc(getattr(self.request, "eta", None))
    lead = 0 if eta is None else max(0.0, (eta - now).total_seconds() * 1000)
    return {"has_eta": eta is not None, "lead_ms": lead}


def _route_of(task):
    info = task.request.delivery_info or {}
    return {k: info.get(k) for k in ("exchange", "routing_key")}


@app.task(bind=True)
def where(self):
    """How the task reached the worker: exchange and routing key."""
    return _route_of(self)


# The routing variant's ``task_routes`` send these three to other queues.


@app.task(bind=True)
def routed_second(self):
    return _route_of(self)


@app.task(bind=True)
def routed_topic(self):
    return _route_of(self)


@app.task(bind=True)
def routed_adhoc(self):
    return _route_of(self)


# --------------------------------------------------------------------------
# Retries
# --------------------------------------------------------------------------


@app.task(bind=True)
def retry_until(self, succeed_at, countdown=0.2, max_retries=2, with_exc=False):
    """Retry until ``retries == succeed_at``; past ``max_retries`` Celery's
    ``Task.retry`` raises ``MaxRetriesExceededError`` (or ``exc``, if given)."""
    record("run", id=self.request.id, retries=self.request.retries)
    if self.request.retries < succeed_at:
        exc = WireError("again", self.request.retries) if with_exc else None
        raise self.retry(exc=exc, countdown=countdown, max_retries=max_retries)
    return {"retries": self.request.retries}


@app.task(bind=True, autoretry_for=(KeyError,), retry_kwargs={"max_retries": 1},
          default_retry_delay=0.2)
def autoretry(self, succeed_at):
    record("run", id=self.request.id, retries=self.request.retries)
    if self.request.retries < succeed_at:
        raise KeyError("missing", self.request.retries)
    return {"retries": self.request.retries}


# --------------------------------------------------------------------------
# Reject, Ignore, acks_late
# --------------------------------------------------------------------------


@app.task(bind=True)
def rejecting(self):
    record("run", id=self.request.id)
    raise Reject("refused", requeue=False)


@app.task(bind=True, acks_late=True)
def rejecting_late(self):
    record("run", id=self.request.id)
    raise Reject("refused late", requeue=False)


@app.task(bind=True)
def ignoring(self):
    record("run", id=self.request.id)
    raise Ignore()


@app.task(bind=True)
def nap(self, seconds):
    """Sleeps: a task running when a test stops its worker."""
    record("run", id=self.request.id)
    time.sleep(seconds)
    return seconds


@app.task(bind=True, acks_late=True)
def late_ok(self, x):
    record("run", id=self.request.id)
    return x


@app.task(bind=True, acks_late=True)
def late_fail(self, x):
    """Fails with ``acks_late``: acked (default), or rejected without requeue
    when ``task_acks_on_failure_or_timeout`` is off. Either way it runs once."""
    record("run", id=self.request.id)
    raise WireError("late", x)


@app.task(bind=True, acks_late=True, acks_on_failure_or_timeout=False)
def late_fail_noack(self, x):
    """The same with the task attribute instead of the setting."""
    record("run", id=self.request.id)
    raise WireError("late noack", x)


def _own_message_unacked(task):
    """Redis broker only: whether kombu still holds this task's message as
    unacknowledged (in the ``unacked`` hash) while the task body runs -
    i.e. whether the worker has acked it before starting the task."""
    url = task.app.conf.broker_url or ""
    if not url.startswith("redis"):
        return None
    client = redis.Redis.from_url(url)
    try:
        return any(task.request.id.encode() in v for v in client.hvals("unacked"))
    finally:
        client.close()


@app.task(bind=True)
def ack_probe(self):
    return {"unacked_while_running": _own_message_unacked(self)}


@app.task(bind=True, acks_late=True)
def ack_probe_late(self):
    return {"unacked_while_running": _own_message_unacked(self)}


# --------------------------------------------------------------------------
# Errbacks
# --------------------------------------------------------------------------


@app.task
def on_err_inline(request, exc, traceback):
    """New-style errback (more than one argument): Celery calls it inline in
    the worker, with the failed task's request; nothing is published."""
    record("errback_inline", id=request.id, exc=f"{type(exc).__name__}{exc.args!r}",
           called_directly=request.called_directly, task=request.task,
           traceback_type=type(traceback).__name__)


@app.task(bind=True)
def on_err_task(self, failed_id):
    """Old-style errback (one argument): published as a task message with
    the failed task's id."""
    record("errback_task", id=self.request.id, failed=failed_id,
           group=self.request.group, parent_id=self.request.parent_id)
    return {"failed": failed_id}


# --------------------------------------------------------------------------
# Waiting on a result inside a task
# --------------------------------------------------------------------------


@app.task
def join_inside(x, y):
    """``result.get()`` inside a task: Celery's solo, threads and prefork
    workers refuse it (``RuntimeError``, the pool's task_join_will_block)."""
    return add.delay(x, y).get(timeout=5)


@app.task
def join_allowed(x, y):
    """The same under ``allow_join_result()``, which Celery permits (the
    pool must have a free slot for ``add``)."""
    from celery.result import allow_join_result

    with allow_join_result():
        return add.delay(x, y).get(timeout=10)
