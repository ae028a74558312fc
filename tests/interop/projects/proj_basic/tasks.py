"""The tasks of ``proj_basic``: the ordinary things every project does.

Each task isolates one observable of the foundation: plain values, every JSON
type, kwargs, failures with builtin and project-defined exceptions, large
results, what ``self.request`` holds, ``ignore_result``, a custom ``Task``
base class with hooks, and ``track_started``.
"""

import json
import time

from celery import Task

from ccit_recorder import record, wait_for_gate

from .celery import app


class ProjectError(Exception):
    """An exception class defined by the project, not by Python or Celery.

    Celery stores ``exc_module``/``exc_type`` so the client re-imports this
    class; a worker that stored anything else would break ``except
    ProjectError`` around ``AsyncResult.get()``.
    """


class RecordingTask(Task):
    """A custom base class with every hook a project commonly overrides."""

    def before_start(self, task_id, args, kwargs):
        record("before_start", name=self.name, id=task_id, args=list(args), kwargs=kwargs)

    def on_success(self, retval, task_id, args, kwargs):
        record("on_success", name=self.name, id=task_id, retval=retval)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        record(
            "on_failure",
            name=self.name,
            id=task_id,
            exc=f"{type(exc).__name__}{exc.args!r}",
            einfo_type=getattr(getattr(einfo, "type", None), "__name__", None),
        )

    def after_return(self, status, retval, task_id, args, kwargs, einfo):
        if isinstance(retval, BaseException):
            retval = f"{type(retval).__name__}{retval.args!r}"
        record("after_return", name=self.name, id=task_id, status=status, retval=retval,
               has_einfo=einfo is not None)


@app.task
def add(x, y):
    return x + y


@app.task
def echo(*args, **kwargs):
    """Return the arguments as received, so their decoding round-trips."""
    return [list(args), kwargs]


@app.task
def kwargs_task(a, b=2, *rest, c=3, **extra):
    return {"a": a, "b": b, "rest": list(rest), "c": c, "extra": extra}


@app.task
def fail():
    raise ValueError("boom", 42)


@app.task
def fail_custom(detail):
    raise ProjectError("custom failure", detail)


@app.task
def big(size=1_000_000):
    """Return a string of ``size`` characters (1 MB by default), not repetitive
    enough to be trivially compressible by accident."""
    chunk = "".join(chr(0x41 + (i * 7) % 26) for i in range(997))
    return (chunk * (size // len(chunk) + 1))[:size]


@app.task
def big_list(n=100_000):
    return [[i, str(i), i % 2 == 0] for i in range(n)]


_REQUEST_FIELDS = (
    "id", "task", "args", "kwargs", "retries", "hostname", "delivery_info",
    "reply_to", "correlation_id", "root_id", "parent_id", "group", "group_index",
    "is_eager", "called_directly", "origin", "ignore_result", "timelimit",
    "time_limit", "soft_time_limit", "shadow", "eta", "expires", "argsrepr",
    "kwargsrepr", "lang", "callbacks", "errbacks", "chain", "chord", "stamps",
    "stamped_headers", "replaced_task_nesting", "headers", "x-custom",
)


@app.task(bind=True)
def request_info(self, *args, **kwargs):
    """Return what ``self.request`` holds: the context a task sees.

    Values go through ``json`` with ``repr`` as fallback so an unexpected
    type shows up as a difference instead of a serialisation error.
    ``properties`` is reduced to its keys: ``delivery_tag`` differs per run.
    """
    req = self.request
    out = {f: getattr(req, f, "<missing>") for f in _REQUEST_FIELDS}
    props = getattr(req, "properties", None)
    out["properties_keys"] = sorted(props) if isinstance(props, dict) else repr(props)
    return json.loads(json.dumps(out, default=repr))


@app.task(ignore_result=True)
def ignored(x):
    return x * 2


@app.task(base=RecordingTask)
def hooked(x):
    return {"x": x}


@app.task(base=RecordingTask)
def hooked_fail(x):
    raise ProjectError("hooked", x)


@app.task(track_started=True)
def slow_started(seconds):
    time.sleep(seconds)
    return seconds


@app.task(track_started=True)
def gated(gate, limit=120):
    """Run until the test opens ``gate`` (see ``ccit_recorder.wait_for_gate``)."""
    return wait_for_gate(gate, limit)


@app.task
def noop():
    """A sentinel: once its result exists, earlier messages were handled."""
    return "done"
