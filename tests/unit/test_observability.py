"""The observability plumbing around the metrics: flags, HTTP endpoint, JSON logs.

The endpoint is served for real on a loopback port and read with urllib;
the flags go through the real ``ccworker`` command-line parser.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

import click
import pytest
from celery import signals
from celery.utils.log import ColorFormatter

from celerycompat.cli import main, parse_worker_options
from celerycompat.observability import jsonlog
from celerycompat.observability.health import Probe
from celerycompat.observability.server import MetricsServer
from celerycompat.observability.settings import ObservabilitySettings

PROJECTS = Path(__file__).parent / "projects"
OWN_VARIABLES = ("CCWORKER_METRICS_PORT", "CCWORKER_METRICS_HOST",
                 "CCWORKER_HEALTH_STALL_TIMEOUT", "CCWORKER_LOG_FORMAT")


@pytest.fixture
def projects(monkeypatch: pytest.MonkeyPatch):
    """Run inside ``projects/``, without our variables, forgetting modules after."""
    monkeypatch.chdir(PROJECTS)
    for name in OWN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    modules, path = set(sys.modules), list(sys.path)
    yield PROJECTS
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    sys.path[:] = path


# -- flags -------------------------------------------------------------------------------


def test_off_by_default(projects):
    options = parse_worker_options(["-A", "plainmod"])
    assert options.observability == ObservabilitySettings()
    assert options.observability.metrics_port is None
    assert options.observability.metrics_host == "127.0.0.1"


def test_flags_fill_the_settings_and_stay_out_of_celerys_keywords(projects):
    options = parse_worker_options([
        "-A", "plainmod", "--metrics-port", "9808", "--metrics-host", "0.0.0.0",
        "--health-stall-timeout", "12.5", "--log-format", "json"])
    assert options.observability == ObservabilitySettings(
        metrics_port=9808, metrics_host="0.0.0.0", stall_timeout=12.5, log_format="json")
    # celeryd_init receivers get Celery's keyword set, nothing of ours.
    assert not {"metrics_port", "metrics_host", "health_stall_timeout",
                "log_format"} & set(options.celery_kwargs)


def test_environment_variables(projects, monkeypatch):
    monkeypatch.setenv("CCWORKER_METRICS_PORT", "9100")
    monkeypatch.setenv("CCWORKER_LOG_FORMAT", "json")
    monkeypatch.setenv("CCWORKER_HEALTH_STALL_TIMEOUT", "30")
    options = parse_worker_options(["-A", "plainmod"])
    assert (options.observability.metrics_port, options.observability.log_format,
            options.observability.stall_timeout) == (9100, "json", 30.0)
    # Not the CELERY_WORKER_<NAME> variables the Celery flags read.
    monkeypatch.delenv("CCWORKER_METRICS_PORT")
    monkeypatch.setenv("CELERY_WORKER_METRICS_PORT", "9200")
    assert parse_worker_options(["-A", "plainmod"]).observability.metrics_port is None


@pytest.mark.parametrize("argv", [
    ["--metrics-port", "70000"], ["--metrics-port", "x"], ["--log-format", "xml"],
    ["--health-stall-timeout", "0"],
])
def test_bad_values_are_usage_errors(projects, argv):
    with pytest.raises(click.UsageError):
        parse_worker_options(["-A", "plainmod", *argv])


def test_an_apps_own_option_of_the_same_name_wins(projects):
    options = parse_worker_options(["-A", "ownmetricsproj", "--metrics-port", "abc"])
    assert options.user_options["metrics_port"] == "abc"
    assert options.observability.metrics_port is None
    assert any("declares its own --metrics-port" in line for line in options.unsupported)


def test_help_shows_the_own_flags_and_their_variables(projects, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["-A", "plainmod", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for text in ("--metrics-port", "--metrics-host", "--health-stall-timeout", "--log-format",
                 "CCWORKER_METRICS_PORT", "CCWORKER_LOG_FORMAT"):
        assert text in out, text


# -- the HTTP endpoint ---------------------------------------------------------------------


class StubMetrics:
    """What the server reads: render and the two probes."""

    def __init__(self) -> None:
        self.live = Probe(True, "ok")
        self.ready = Probe(False, "starting", "not yet")
        self.fail = False

    def render(self) -> str:
        if self.fail:
            raise RuntimeError("boom")
        return "# TYPE x counter\nx_total 1\n"

    def liveness(self) -> Probe:
        return self.live

    def readiness(self) -> Probe:
        return self.ready


def fetch(base: str, path: str, method: str = "GET"):
    request = urllib.request.Request(base + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@pytest.fixture
def served():
    metrics = StubMetrics()
    server = MetricsServer(metrics)  # defaults: loopback, any free port
    host, port = server.start()
    try:
        yield metrics, f"http://{host}:{port}", host
    finally:
        server.stop()


def test_endpoint_paths_statuses_and_types(served):
    metrics, base, host = served
    assert host == "127.0.0.1"
    status, headers, body = fetch(base, "/metrics")
    assert (status, body) == (200, b"# TYPE x counter\nx_total 1\n")
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    status, headers, body = fetch(base, "/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok", "detail": ""})
    assert headers["Content-Type"] == "application/json"
    status, _, body = fetch(base, "/readyz")
    assert (status, json.loads(body)["status"]) == (503, "starting")
    metrics.live = Probe(False, "stalled", "for a while")
    assert fetch(base, "/healthz")[0] == 503
    assert fetch(base, "/healthz?verbose=1")[0] == 503
    assert fetch(base, "/elsewhere")[0] == 404
    status, headers, body = fetch(base, "/metrics", method="HEAD")
    assert (status, body) == (200, b"") and int(headers["Content-Length"]) > 0
    metrics.fail = True
    assert fetch(base, "/metrics")[0] == 500
    assert fetch(base, "/readyz")[0] == 503  # still answering after an error


def test_a_forked_child_does_not_keep_the_listening_socket(served):
    _, base, _ = served
    pid = os.fork()
    if pid == 0:  # the child: what a prefork pool process would inherit
        from celerycompat.observability import server as module

        closed = all(s.socket.fileno() == -1 for s in module._SERVERS)
        os._exit(0 if closed else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert fetch(base, "/metrics")[0] == 200  # the parent still serves


def test_a_restarted_worker_can_bind_the_same_port_at_once():
    server = MetricsServer(StubMetrics())
    host, port = server.start()
    # An answered request leaves a TIME_WAIT connection on the port, on the
    # server's side: it closes first (HTTP/1.0), which reading to EOF waits for.
    with socket.create_connection((host, port), timeout=10) as client:
        client.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        reply = b""
        while chunk := client.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.0 200")
    server.stop()
    again = MetricsServer(StubMetrics(), host, port)
    assert again.start() == (host, port)
    again.stop()


# -- JSON log lines ------------------------------------------------------------------------


def record(msg="hello %s", args=("world",), **extra):
    rec = logging.LogRecord("celery.worker.strategy", logging.INFO, __file__, 1, msg, args,
                            None)
    rec.__dict__.update(extra)
    return rec


def test_json_line_fields():
    line = jsonlog.JsonFormatter("w1@host").format(
        record(data={"id": "abc", "name": "proj.add", "eta": None}))
    entry = json.loads(line)
    assert "\n" not in line
    assert list(entry)[:4] == ["time", "level", "logger", "message"]
    assert entry["time"].endswith("Z")
    assert (entry["level"], entry["logger"], entry["message"]) == \
        ("INFO", "celery.worker.strategy", "hello world")
    assert (entry["hostname"], entry["task_id"], entry["task_name"]) == \
        ("w1@host", "abc", "proj.add")
    assert entry["data"] == {"id": "abc", "name": "proj.add", "eta": None}
    assert entry["pid"] == os.getpid()


def test_json_line_with_exception_and_unserialisable_values():
    try:
        raise ValueError("bad")
    except ValueError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %r", (object(),),
                                sys.exc_info())
    rec.data = {"when": object()}
    entry = json.loads(jsonlog.JsonFormatter().format(rec))
    assert entry["message"].startswith("failed: <object object")
    assert "ValueError: bad" in entry["exc_info"]
    assert "hostname" not in entry and "task_id" not in entry


def test_only_celerys_formatters_are_swapped_on_its_signals():
    logger = logging.getLogger("ccworker-test-json")
    celery_handler = logging.StreamHandler(io.StringIO())
    celery_handler.setFormatter(ColorFormatter("%(message)s", use_color=False))
    own_handler = logging.StreamHandler(io.StringIO())
    own_formatter = logging.Formatter("%(message)s")
    own_handler.setFormatter(own_formatter)
    logger.handlers = [celery_handler, own_handler]
    try:
        jsonlog.install("w@h")
        signals.after_setup_task_logger.send(sender=None, logger=logger)
        assert isinstance(celery_handler.formatter, jsonlog.JsonFormatter)
        assert own_handler.formatter is own_formatter
    finally:
        jsonlog.uninstall()
        logger.handlers = []
    assert not jsonlog._RECEIVERS
