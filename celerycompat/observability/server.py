"""The HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz`` on a daemon thread.

A thin adapter over `WorkerMetrics`: every request is answered from what
the metrics object holds, on the server's own threads, so the consumer loop
never waits for a scrape (and a scrape never waits for the loop: a stalled
consumer is exactly what ``/healthz`` must still be able to report).

Binds to 127.0.0.1 unless told otherwise (``--metrics-host``): the
endpoint has no authentication, and in a container the probes and the
scraper usually reach it through an explicit host setting anyway.

Under ``-P gevent`` the threads are greenlets (the process is
monkey-patched): a task that blocks the event loop blocks the endpoint too,
so the probe times out, which Kubernetes counts as a failure.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from celerycompat.observability.health import Probe
from celerycompat.observability.metrics import CONTENT_TYPE

logger = logging.getLogger("celerycompat.observability")

_SERVERS: weakref.WeakSet[_Server] = weakref.WeakSet()
_FORK_HOOK = False


def _close_in_child() -> None:
    """A forked pool process must not keep the listening socket open: the port
    would stay taken after the worker exits, and connections could queue on
    a socket nobody accepts from."""
    for server in list(_SERVERS):
        try:
            server.socket.close()
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # SO_REUSEADDR: a restarted worker can bind at once (TIME_WAIT sockets).
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], metrics: Any) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.metrics = metrics
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # TCPServer's bind (SO_REUSEADDR, then bind), not HTTPServer's, which
        # then looks up the FQDN of the address and can wait on DNS.
        socketserver.TCPServer.server_bind(self)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "ccworker"
    timeout = 10  # a client that stalls mid-request frees its thread

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        path = self.path.split("?", 1)[0]
        metrics = self.server.metrics
        try:
            if path == "/metrics":
                status, kind, body = 200, CONTENT_TYPE, metrics.render().encode()
            elif path in ("/healthz", "/livez"):
                status, kind, body = _probe(metrics.liveness())
            elif path == "/readyz":
                status, kind, body = _probe(metrics.readiness())
            elif path == "/":
                status, kind = 200, "text/plain; charset=utf-8"
                body = b"ccworker: /metrics /healthz /readyz\n"
            else:
                status, kind, body = 404, "text/plain; charset=utf-8", b"not found\n"
        except Exception:  # a bug of ours must not kill the endpoint
            logger.exception("metrics endpoint: error answering %s", path)
            status, kind, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Probes every few seconds would flood the worker log at INFO.
        logger.debug("metrics endpoint: %s - %s", self.address_string(), format % args)


def _probe(probe: Probe) -> tuple[int, str, bytes]:
    body = json.dumps(probe.as_dict()).encode() + b"\n"
    return (200 if probe.ok else 503), "application/json", body


class MetricsServer:
    """Serve `metrics` (a `WorkerMetrics`) over HTTP until `stop`."""

    def __init__(self, metrics: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (the real port when 0 was asked for)."""
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> tuple[str, int]:
        """Bind and serve on a daemon thread; OSError if the address is taken."""
        global _FORK_HOOK
        server = _Server((self.host, self.port), self.metrics)
        self._server = server
        _SERVERS.add(server)
        if not _FORK_HOOK and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_close_in_child)
            _FORK_HOOK = True
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="ccworker-metrics", daemon=True)
        self._thread.start()
        return self.address

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        _SERVERS.discard(server)
