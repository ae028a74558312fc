"""Integrations a Celery project keeps when its workers become ccworkers, unchanged.

Each test runs a project using the real integration under ``celery worker``
and under ``ccworker`` and compares what the integration produced, seen from
outside the worker:

* **sentry-sdk** (``CeleryIntegration``): the envelopes a local fake Sentry
  (an HTTP server thread here, the projects' DSN pointing at it) receives:
  the error event of a failing task (exception, mechanism, the task's tags
  and breadcrumbs) and the task transactions;
* **opentelemetry-instrumentation-celery**: the spans the worker process
  exports (the project writes them to Redis): ``run/<task>`` with the task's
  attributes, ``apply_async/<task>`` for a task published from a task, the
  parentage and trace between them, the error status and exception event;
* **django-celery-results** (``CELERY_RESULT_BACKEND = "django-db"``): the
  results a Django client process reads back, and the rows the worker wrote;
* **Celery's Django fixup**: database connections of the task's thread
  closed in ``task_prerun`` and ``task_postrun``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
import subprocess
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
from celery import Celery

import harness

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

WAIT = 30.0


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def redis_broker() -> harness.BrokerEnv:
    return harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))


@contextlib.contextmanager
def running(specs: dict, log_dir: Path, prepare=None) -> Iterator[dict]:
    """One fresh worker per kind (``specs``: kind -> WorkerSpec), started
    together, stopped and cleaned up afterwards."""
    broker = redis_broker()
    workers = {kind: harness.WorkerProcess(kind, spec, broker, log_dir)
               for kind, spec in specs.items()}
    try:
        for worker in workers.values():
            if prepare is not None:
                prepare(worker)
            worker.start()
        for worker in workers.values():
            worker.wait_ready()
        yield workers
    finally:
        for worker in workers.values():
            worker.request_stop()
        for worker in workers.values():
            worker.stop()
            broker.forget_queue(worker.token, worker.queue)
            with contextlib.suppress(Exception):
                client = redis.Redis.from_url(broker.results_url)
                client.delete(worker.record_key)
                client.close()


@contextlib.contextmanager
def plain_client(worker: harness.WorkerProcess) -> Iterator[Celery]:
    """A producer that is not the project: sends by name, reads Redis results.
    (Importing a project here would run its ``sentry_sdk.init``, Django setup
    or instrumentation in the test process.)"""
    app = Celery("client", broker=worker.env["CC_TEST_BROKER"],
                 backend=worker.env["CC_TEST_BACKEND"], set_as_current=False)
    app.conf.task_default_queue = worker.queue
    try:
        yield app
    finally:
        app.close()


def records(worker: harness.WorkerProcess) -> list:
    client = redis.Redis.from_url(worker.broker.results_url)
    try:
        return [json.loads(r) for r in client.lrange(worker.record_key, 0, -1)]
    finally:
        client.close()


def wait_for(predicate, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


def reference(observed: dict) -> Any:
    return observed.get("celery") or next(iter(observed.values()))


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def scrub(value: Any, worker: harness.WorkerProcess, ids: list) -> Any:
    """Ids, node names and queue names out of a JSON-able value."""
    if isinstance(value, dict):
        return {k: scrub(v, worker, ids) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub(v, worker, ids) for v in value]
    if isinstance(value, str):
        value = value.replace(worker.nodename, "<node>").replace(worker.queue, "<queue>")
        for i, task_id in enumerate(ids):
            value = value.replace(task_id, f"<id{i}>")
        # kombu's ``origin`` header: the publishing process (``gen<pid>@host``).
        value = re.sub(r"\bgen\d+@", "gen<pid>@", value)
        return UUID.sub("<uuid>", value)
    return value


# --------------------------------------------------------------------------
# sentry-sdk
# --------------------------------------------------------------------------


class FakeSentry:
    """A Sentry ingestion endpoint on 127.0.0.1 that keeps every envelope item.

    The SDK posts envelopes to ``/api/<project>/envelope/`` (gzip or plain);
    items are kept per project id, so each worker gets its own DSN.
    """

    def __init__(self) -> None:
        self.items: dict[str, list] = {}
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                elif encoding == "br":
                    import brotli
                    body = brotli.decompress(body)
                project = self.path.strip("/").split("/")[1]
                collector.add(project, body)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, project: str, body: bytes) -> None:
        lines = body.split(b"\n")
        items, i = [], 1
        while i < len(lines):
            if not lines[i].strip():
                i += 1
                continue
            header = json.loads(lines[i])
            payload = lines[i + 1] if i + 1 < len(lines) else b""
            with contextlib.suppress(ValueError):
                items.append((header.get("type"), json.loads(payload)))
            i += 2
        with self.lock:
            self.items.setdefault(project, []).extend(items)

    def of(self, project: str, kind: str) -> list:
        with self.lock:
            return [payload for t, payload in self.items.get(project, []) if t == kind]

    def dsn(self, project: int) -> str:
        return f"http://publickey@127.0.0.1:{self.server.server_address[1]}/{project}"

    def __enter__(self) -> FakeSentry:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def sentry_error(event: dict, task_id: str) -> dict:
    """What a Sentry user sees of a task's error event."""
    exception = event["exception"]["values"][-1]
    frames = (exception.get("stacktrace") or {}).get("frames") or []
    return {
        "type": exception["type"],
        "value": exception["value"],
        "mechanism": exception.get("mechanism"),
        "raised_in": frames[-1].get("function") if frames else None,
        "level": event.get("level"),
        "tag_celery_task_id_is_task": event.get("tags", {}).get("celery_task_id") == task_id,
        "celery_job": event.get("extra", {}).get("celery-job"),
        "transaction": event.get("transaction"),
        "trace_op": event.get("contexts", {}).get("trace", {}).get("op"),
        "breadcrumbs": [b.get("message") for b in
                        (event.get("breadcrumbs") or {}).get("values", [])
                        if b.get("category") == "task"],
        "release": event.get("release"),
        "environment": event.get("environment"),
    }


def sentry_transaction(event: dict, ids: dict) -> dict:
    trace = event.get("contexts", {}).get("trace", {})
    return {
        "transaction": event.get("transaction"),
        "source": event.get("transaction_info", {}).get("source"),
        "op": trace.get("op"),
        "status": trace.get("status"),
        "origin": trace.get("origin"),
        "tag_celery_task_id_is": ids.get(event.get("tags", {}).get("celery_task_id")),
        # The integration's own spans; spans of other integrations (redis-py
        # calls of the result write, the HTTP post of the error event) follow
        # how each worker stores results, not the Celery integration.
        "spans": sorted((s.get("op"), s.get("description"), s.get("status"))
                        for s in event.get("spans", [])
                        if str(s.get("op", "")).startswith("queue.")),
    }


def test_sentry_celery_integration(interop_log_dir):
    """A failing task's exception reaches Sentry with the task's tags, extra
    and breadcrumbs, and every run is a ``queue.task.celery`` transaction, as
    under ``celery worker`` (prefork, Celery's default pool)."""
    with FakeSentry() as sentry:
        specs = {kind: harness.WorkerSpec(
            project="proj_sentry", pool="prefork", concurrency=1,
            env=(("CC_TEST_SENTRY_DSN", sentry.dsn(n)),))
            for n, kind in enumerate(harness.selected_kinds(), start=1)}
        projects = {kind: str(n) for n, kind in enumerate(specs, start=1)}
        observed = {}
        with running(specs, interop_log_dir) as workers:
            for kind, worker in workers.items():
                project = projects[kind]
                with plain_client(worker) as app:
                    bad = app.send_task("proj_sentry.tasks.fail", ("boom",))
                    good = app.send_task("proj_sentry.tasks.ok", (21,))
                    bad.get(timeout=harness.GET_TIMEOUT, propagate=False)
                    value = good.get(timeout=harness.GET_TIMEOUT)
                    arrived = wait_for(lambda p=project: len(sentry.of(p, "event")) >= 1
                                       and len(sentry.of(p, "transaction")) >= 2)
                    errors = sentry.of(project, "event")
                    observed[kind] = {
                        "ok_result": value,
                        "fail_state": bad.state,
                        "arrived": arrived,
                        "errors": [scrub(sentry_error(e, bad.id), worker, [bad.id, good.id])
                                   for e in errors],
                        "transactions": sorted(
                            (sentry_transaction(e, {bad.id: "fail", good.id: "ok"})
                             for e in sentry.of(project, "transaction")),
                            key=lambda t: json.dumps(t, sort_keys=True)),
                    }
    ref = reference(observed)
    assert ref["arrived"] and len(ref["errors"]) == 1, ref
    assert ref["errors"][0]["type"] == "ValueError" and ref["errors"][0]["value"] == "boom", ref
    assert ref["errors"][0]["mechanism"]["type"] == "celery", ref
    assert ref["errors"][0]["tag_celery_task_id_is_task"], ref
    assert [t["tag_celery_task_id_is"] for t in ref["transactions"]] == ["fail", "ok"] or \
        sorted(t["tag_celery_task_id_is"] for t in ref["transactions"]) == ["fail", "ok"], ref
    harness.assert_same_across_kinds(observed)


# --------------------------------------------------------------------------
# opentelemetry-instrumentation-celery
# --------------------------------------------------------------------------


SPAN_ID_KEYS = ("messaging.message.id", "messaging.conversation_id")


def otel_spans(spans: list, worker: harness.WorkerProcess, ids: dict) -> list:
    """Spans as comparable facts: names, kinds, status, attributes (ids
    replaced by the task they belong to), events, and who is whose parent."""
    by_id = {s["span_id"]: s for s in spans}
    out = []
    for span in spans:
        parent = by_id.get(span["parent_id"]) if span["parent_id"] else None
        attributes = {}
        for key, value in span["attributes"].items():
            if key in SPAN_ID_KEYS:
                value = ids.get(value, "<other id>")
            attributes[key] = value
        out.append({
            "name": span["name"],
            "kind": span["kind"],
            "status": span["status"],
            "parent": parent["name"] if parent else ("<remote>" if span["parent_id"] else None),
            "same_trace_as_parent": parent is None or parent["trace_id"] == span["trace_id"],
            "attributes": scrub(attributes, worker, []),
            "events": [{"name": e["name"],
                        "exception.type": e["attributes"].get("exception.type")}
                       for e in span["events"]],
        })
    return sorted(out, key=lambda s: json.dumps(s, sort_keys=True))


def test_opentelemetry_celery_instrumentation(interop_log_dir):
    """Spans from the worker process: ``run/<task>`` per run with the task's
    attributes, ``apply_async/<task>`` for a task sent from a task, the child
    run in the same trace under it, an ERROR run with its exception event."""
    spec = harness.WorkerSpec(project="proj_otel", pool="prefork", concurrency=1)
    observed = {}
    with running(dict.fromkeys(harness.selected_kinds(), spec), interop_log_dir) as workers:
        for kind, worker in workers.items():
            with plain_client(worker) as app:
                parent = app.send_task("proj_otel.tasks.parent", (1,))
                broken = app.send_task("proj_otel.tasks.broken", ("nope",))
                parent.get(timeout=harness.GET_TIMEOUT)
                broken.get(timeout=harness.GET_TIMEOUT, propagate=False)

                def spans(w=worker) -> list:
                    return [d for event, d in records(w) if event == "span"]

                arrived = wait_for(lambda: len(spans()) >= 4)
                found = spans()
                child_ids = [s["attributes"].get("messaging.message.id") for s in found
                             if s["name"] == "run/proj_otel.tasks.child"]
                ids = {parent.id: "parent", broken.id: "broken",
                       **{i: "child" for i in child_ids if i}}
                observed[kind] = {"arrived": arrived,
                                  "spans": otel_spans(found, worker, ids)}
    ref = reference(observed)
    names = sorted(s["name"] for s in ref["spans"])
    assert ref["arrived"] and names == ["apply_async/proj_otel.tasks.child",
                                        "run/proj_otel.tasks.broken",
                                        "run/proj_otel.tasks.child",
                                        "run/proj_otel.tasks.parent"], ref
    harness.assert_same_across_kinds(observed)


# --------------------------------------------------------------------------
# Django: django-celery-results and the fixup's connection handling
# --------------------------------------------------------------------------


def django_env(worker: harness.WorkerProcess) -> dict:
    env = worker.process_env()
    env["PYTHONPATH"] = str(harness.PROJECTS_DIR)
    env["DJANGO_SETTINGS_MODULE"] = f"{worker.spec.project}.settings"
    return env


def django_migrate(worker: harness.WorkerProcess) -> None:
    """``migrate`` of the worker's own sqlite database, as a deploy step does."""
    done = subprocess.run([sys.executable, "-m", "django", "migrate", "--noinput", "-v", "0"],
                          cwd=str(harness.PROJECTS_DIR), env=django_env(worker),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_django_celery_results_backend(interop_log_dir, tmp_path):
    """``CELERY_RESULT_BACKEND = "django-db"``: a Django client process reads
    the results (value, exception) and finds the same ``TaskResult`` rows."""
    spec = harness.WorkerSpec(project="djproj_extras", pool="threads", concurrency=2,
                              env=(("CC_TEST_DJANGO_DIR", str(tmp_path)),
                                   ("CC_TEST_BACKEND", "django-db")))
    observed = {}
    with running(dict.fromkeys(harness.selected_kinds(), spec), interop_log_dir,
                 prepare=django_migrate) as workers:
        for kind, worker in workers.items():
            done = subprocess.run(
                [sys.executable, "-m", "djproj_extras.client", str(harness.GET_TIMEOUT)],
                cwd=str(harness.PROJECTS_DIR), env=django_env(worker),
                capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr + worker.log_tail(40)
            seen = json.loads(done.stdout)
            observed[kind] = scrub(seen, worker, seen.pop("ids"))
    ref = reference(observed)
    assert ref["add"] == 5 and ref["add_state"] == "SUCCESS", ref
    assert ref["fail"] == {"type": "ValueError", "args": ["boom"]}, ref
    assert ref["rows"]["add"]["status"] == "SUCCESS" and ref["rows"]["add"]["worker"] == "<node>"
    harness.assert_same_across_kinds(observed)


@pytest.mark.parametrize("pool", ["prefork", "threads"])
def test_django_fixup_closes_connections_per_task(interop_log_dir, tmp_path, pool):
    """Celery's Django fixup, installed at ``worker_init``, closes the task
    thread's database connections in ``task_prerun`` (one opened just before
    it is closed when the body starts) and in ``task_postrun`` (the one the
    task used is closed after it)."""
    spec = harness.WorkerSpec(project="djproj_extras", pool=pool, concurrency=2,
                              env=(("CC_TEST_DJANGO_DIR", str(tmp_path)),))
    observed = {}
    with running(dict.fromkeys(harness.selected_kinds(), spec), interop_log_dir,
                 prepare=django_migrate) as workers:
        for kind, worker in workers.items():
            with plain_client(worker) as app:
                results = [app.send_task("djproj_extras.probes.tasks.db_probe")
                           for _ in range(3)]  # (3: the postrun records awaited below)
                values = [r.get(timeout=harness.GET_TIMEOUT) for r in results]
            ids = [r.id for r in results]
            # task_postrun comes after the result is stored: wait for the last ones.
            wait_for(lambda w=worker, n=3: sum(
                1 for event, _ in records(w) if event == "postrun_after_fixup") >= n)
            probes = [[event, d] for event, d in records(worker)
                      if event in ("prerun_opened", "body", "postrun_after_fixup")]
            per_task = {f"task{i}": [[event, {k: v for k, v in d.items() if k != "task_id"}]
                                     for event, d in probes if d.get("task_id") == task_id]
                        for i, task_id in enumerate(ids)}
            observed[kind] = {"values": values, "per_task": per_task}
    ref = reference(observed)
    expected = [["prerun_opened", {"open": True}],
                ["body", {"closed_at_start": True, "open_after_query": True}],
                ["postrun_after_fixup", {"open": False}]]
    assert ref["values"] == [1, 1, 1], ref
    assert all(steps == expected for steps in ref["per_task"].values()), ref
    harness.assert_same_across_kinds(observed)
