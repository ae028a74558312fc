"""Fault injection: brokers restarted, workers killed, connections gone half-open.

Under a steady stream of tasks (a producer thread sending one every 50 ms
plus the send itself, 5-15 a second on a loaded CI box; half ``acks_late``,
half early ack), each scenario injects the same fault
``RESTARTS`` times and then checks what a user cares about:

* every task id sent has a SUCCESS result (nothing lost);
* a message ran more than once only if it was un-acked when the fault hit,
  so duplicates are counted, printed, and bounded by the prefetch window
  per fault (the ack policy's promise: ``acks_late`` at least once; early
  ack at most once unless the ack itself died with the connection);
* the time from the broker being back (or the worker restarted) to the end
  of the first task that started after it is printed and bounded
  (``RESUME_BOUND``, generous: the reconnection backoff is kombu's 2, 4,
  6... seconds, as in Celery);
* after the last fault, the remote-control mailbox answers ``ping`` and
  events (heartbeats, task events) flow again.

Scenarios: (a) Redis killed and restarted, (b) a RabbitMQ node killed or
stopped and restarted, (c) the worker killed with SIGKILL and restarted
(``acks_late``, Redis and RabbitMQ), (d) the worker's connection going
silent without closing (a half-open connection, through a proxy that stops
forwarding), and Celery's ``broker_connection_retry*`` settings with the
broker down at start or lost later (differential, exit codes and lines).

The brokers that get restarted are the tests' own, never the shared ones: a
``redis-server`` on a free port, and a second RabbitMQ node (its own node
name, ports, Mnesia and log directories under a temporary directory).
Results and run records go to the shared Redis (db 11), which is never
touched. The Redis broker keeps an append-only file with
``appendfsync always``: a Redis without persistence loses every queued
message when it is killed, which no worker can undo, so "nothing lost"
would test Redis, not the worker. On AMQP the producer uses publisher
confirms for the same reason (a confirmed persistent message survives a
killed node). The producer retries a failed send with a new ``attempt``
number, so a run counted twice is always a redelivery, never a resend.

The figures printed here are those of docs/reliability.md. Run one
scenario with, e.g.::

    .venv/bin/python -m pytest tests/interop/test_faults.py -q -s -k redis_restarts

``CC_FAULT_WORKERS=celery`` (or ``ccworker,celery``) runs the same scenarios
against ``celery worker`` for comparison; CI runs ccworker only. The
startup and retry-settings tests are differential (both kinds always).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import redis

import harness
from celerycompat.consumer.liveness import readable

pytestmark = [pytest.mark.interop, pytest.mark.serial, pytest.mark.timeout(240)]

PROJECT = "proj_faults"
RESTARTS = 5
#: Broker back (or worker restarted) -> first task completed, at most. Generous:
#: kombu's reconnection backoff alone is 2, 4, 6 s... (Celery's too).
RESUME_BOUND = 30.0
#: A half-open connection must be noticed within this (the liveness timeout
#: the test sets, plus the poll, plus slack).
DETECT_BOUND = 30.0
#: Seconds between two sends of the producer, and what each task sleeps.
SEND_INTERVAL = 0.05
TASK_SECONDS = 0.1
#: Redis ``visibility_timeout`` of the worker-kill scenario (the dead worker's
#: messages come back after it) and of the others (messages held by a
#: connection that died come back after it, if nothing gives them back sooner).
KILL_VT = 4.0
VT = 10.0
#: The liveness timeout given to ccworker in these tests (default 30 s).
LIVENESS_ENV = ("CCWORKER_BROKER_LIVENESS_TIMEOUT", "5")


def fault_kinds() -> list[str]:
    value = os.environ.get("CC_FAULT_WORKERS", "ccworker")
    kinds = [kind.strip() for kind in value.split(",") if kind.strip()]
    assert all(kind in harness.WORKER_KINDS for kind in kinds), value
    return kinds


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def wait_until(predicate: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.05) -> float:
    """Poll ``predicate`` until true; return the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic() - started
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def results_client() -> redis.Redis:
    return redis.Redis.from_url(harness.redis_db_url(harness.RESULT_DB))


@dataclass(frozen=True)
class FaultSpec(harness.WorkerSpec):
    """The harness's worker flags with heartbeats (every second) and task events on,
    so the scenarios see the event dispatcher come back too."""

    def flags(self, nodename: str) -> list[str]:
        flags = [f for f in super().flags(nodename) if f != "--without-heartbeat"]
        at = len(flags) - len(self.extra_flags)
        return [*flags[:at], "-E", "--heartbeat-interval", "1", *flags[at:]]


# --------------------------------------------------------------------------
# Brokers the tests own (and kill)
# --------------------------------------------------------------------------


class RedisServer:
    """A ``redis-server`` on a free port, killed with SIGKILL and restarted on it.

    Append-only file with ``appendfsync always`` (see the module docstring):
    what Redis acknowledged survives the kill.
    """

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> float:
        """Start (again) on the same port; return when it answers PING (time.time())."""
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH: the fault tests start their own")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir),
             "--logfile", str(self.dir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_until(self.ping, 20, f"redis-server on port {self.port}")
        return time.time()

    def ping(self) -> bool:
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def rabbit_bindir() -> Path:
    """Where the real RabbitMQ scripts are (not Debian's ``su rabbitmq`` wrappers,
    which would drop the environment that makes this a separate node)."""
    configured = os.environ.get("CC_RABBITMQ_BIN")
    candidates = [Path(configured)] if configured else []
    candidates.append(Path("/usr/lib/rabbitmq/bin"))
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(os.path.realpath(found)).parent)
    for candidate in candidates:
        if (candidate / "rabbitmq-server").is_file() and (candidate / "rabbitmqctl").is_file():
            return candidate
    pytest.fail("rabbitmq-server not found (set CC_RABBITMQ_BIN to its bin directory): "
                "the fault tests start a RabbitMQ node of their own")


class RabbitNode:
    """A second RabbitMQ node: its own name, ports, Mnesia and logs in ``workdir``.

    Killed with SIGKILL (its whole process group: the script, ``beam.smp``
    and its helpers) or stopped with ``rabbitmqctl stop``, and started again
    on the same data, so durable queues and persistent messages survive.
    """

    def __init__(self, workdir: Path) -> None:
        self.bindir = rabbit_bindir()
        self.dir = workdir
        self.port = free_port()
        self.name = f"ccfault{os.getpid()}x{free_port()}@localhost"
        self.proc: subprocess.Popen | None = None
        conf = workdir / "rabbitmq.conf"
        conf.write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (workdir / "enabled_plugins").write_text("[].\n")
        (workdir / "rabbitmq-env.conf").write_text("")
        self.env = {
            **os.environ,
            "HOME": str(workdir),  # the Erlang cookie the node and rabbitmqctl share
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(conf),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(workdir / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(workdir / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> float:
        """Start the node; return when it accepts an AMQP connection (time.time())."""
        with open(self.dir / "server.out", "ab") as out:
            self.proc = subprocess.Popen(
                [str(self.bindir / "rabbitmq-server")], env=self.env, cwd=str(self.dir),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"RabbitMQ node {self.name} exited at start:\n"
                                     + self.tail())
            return self.accepts()

        wait_until(up, 120, f"RabbitMQ node {self.name}", interval=0.2)
        return time.time()

    def accepts(self) -> bool:
        """The node takes an AMQP connection."""
        return amqp_accepts(self.url)

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "server.out").read_text(errors="replace")[-3000:]
        return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        """Graceful: ``rabbitmqctl stop``, as a service manager's restart does."""
        if self.proc is None or self.proc.poll() is not None:
            return
        subprocess.run([str(self.bindir / "rabbitmqctl"), "-n", self.name, "stop"],
                       env=self.env, capture_output=True, timeout=60)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill()
        # The script may exit before its helpers: nothing of the node may remain.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def amqp_accepts(url: str) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=1) as conn:
            conn.connect()
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------
# A TCP proxy that can go silent (a half-open connection)
# --------------------------------------------------------------------------


class BlackholeProxy:
    """Forwards TCP to ``upstream_port`` until `freeze`; then goes silent.

    Frozen, every connection it carries stops forwarding in both directions
    but stays open: the worker's writes succeed and nothing ever comes back,
    which is what a peer that vanished behind a NAT, a firewall or a dead
    host looks like. New connections are refused until `thaw`; connections
    frozen once stay dead for good, as they would in production.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._listening = True
        self._peer: dict[socket.socket, socket.socket] = {}
        self._dead: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="blackhole-proxy", daemon=True)

    def start(self) -> BlackholeProxy:
        self._thread.start()
        wait_until(lambda: self._listener is not None, 5, "the proxy to listen")
        return self

    def freeze(self) -> None:
        with self._lock:
            self._dead.update(self._peer)
            self._listening = False

    def thaw(self) -> None:
        with self._lock:
            self._listening = True

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in [*self._peer, *self._dead]:
            with contextlib.suppress(OSError):
                sock.close()

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception as exc:  # the proxy must outlive anything a peer does
                print(f"blackhole proxy: {exc!r}")
                time.sleep(0.05)

    def _turn(self) -> None:
        with self._lock:
            if self._listening and self._listener is None:
                self._listen()
            elif not self._listening and self._listener is not None:
                self._listener.close()
                self._listener = None
            live = [sock for sock in self._peer if sock not in self._dead]
        readers = live + ([self._listener] if self._listener is not None else [])
        # readable(): poll, not select, which fails once this long test
        # process holds a descriptor above 1024.
        ready = readable(readers, 0.05)
        for sock in ready:
            if sock is self._listener:
                self._accept()
                continue
            with self._lock:
                if sock in self._dead or sock not in self._peer:
                    continue
                other = self._peer[sock]
            try:
                data = sock.recv(65536)
                if data:
                    other.sendall(data)
                    continue
            except OSError:
                pass
            self._drop(sock, other)

    def _accept(self) -> None:
        assert self._listener is not None
        client, _ = self._listener.accept()
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream), 5)
        except OSError:
            client.close()
            return
        for sock in (client, upstream):
            sock.settimeout(5)  # a peer that stops reading never blocks the proxy
        with self._lock:
            self._peer[client] = upstream
            self._peer[upstream] = client

    def _drop(self, sock: socket.socket, other: socket.socket) -> None:
        with self._lock:
            for each in (sock, other):
                self._peer.pop(each, None)
                with contextlib.suppress(OSError):
                    each.close()


# --------------------------------------------------------------------------
# The producer and what the tasks recorded
# --------------------------------------------------------------------------


class Producer:
    """A steady stream of tasks from a thread; each send is retried until the broker has it.

    A failed send is retried with the same task id and the next ``attempt``
    number, on a fresh connection, without kombu's own retry (which would
    resend the very same message and make a resend look like a redelivery).
    """

    def __init__(self, app: Any, url: str, key: str, names: list[str],
                 seconds: float = TASK_SECONDS, interval: float = SEND_INTERVAL) -> None:
        self.app = app
        self.url = url
        self.key = key
        self.names = names
        self.seconds = seconds
        self.interval = interval
        self.sent: dict[str, list[tuple[int, float]]] = {}
        self.kind_of: dict[str, str] = {}
        self.failed_sends = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="producer", daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the producer did not stop"

    def ids(self) -> list[str]:
        with self._lock:
            return list(self.sent)

    def _connection(self) -> Any:
        from kombu import Connection

        options = dict(self.app.conf.broker_transport_options or {})
        if self.url.startswith("redis"):
            options["socket_timeout"] = 5
        conn = Connection(self.url, transport_options=options, connect_timeout=2, heartbeat=0)
        conn.ensure_connection(max_retries=1)
        return conn

    def _run(self) -> None:
        conn = None
        count = 0
        while not self._stop.is_set():
            name = self.names[count % len(self.names)]
            count += 1
            task = self.app.tasks[name]
            task_id = str(uuid.uuid4())
            attempt = 0
            while not self._stop.is_set():
                sent_at = time.time()
                try:
                    if conn is None:
                        conn = self._connection()
                    task.apply_async((self.key, attempt, sent_at, self.seconds),
                                     task_id=task_id, connection=conn, retry=False)
                except Exception:
                    self.failed_sends += 1
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            conn.release()
                    conn = None
                    attempt += 1
                    time.sleep(0.2)
                    continue
                with self._lock:
                    self.sent.setdefault(task_id, []).append((attempt, sent_at))
                    self.kind_of[task_id] = name
                break
            time.sleep(self.interval)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.release()


class Runs:
    """What the tasks wrote down: run counts and completions (``proj_faults/tasks.py``)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.client = results_client()
        self._offset = 0
        self.done: list[dict] = []

    def refresh(self) -> list[dict]:
        raw = self.client.lrange(f"{self.key}.done", self._offset, -1)
        self._offset += len(raw)
        new = [json.loads(item) for item in raw]
        self.done.extend(new)
        return new

    def first_completed_after(self, since: float, timeout: float) -> float:
        """Seconds from ``since`` to the end of the first task sent after it."""
        found: list[float] = []

        def completed() -> bool:
            self.refresh()
            found[:] = [d["finished"] for d in self.done if d["sent_at"] >= since]
            return bool(found)

        wait_until(completed, timeout, "a task sent after the fault to complete", 0.1)
        return min(found) - since

    def first_started_after(self, since: float, timeout: float) -> float:
        """Seconds from ``since`` to the end of the first task that started after it."""
        found: list[float] = []

        def completed() -> bool:
            self.refresh()
            found[:] = [d["finished"] for d in self.done if d["started"] >= since]
            return bool(found)

        wait_until(completed, timeout, "a task to start and complete after the restart", 0.1)
        return min(found) - since

    def starts(self) -> dict[str, list[float]]:
        """When each run began, per ``<task id>:<attempt>``."""
        out: dict[str, list[float]] = {}
        for raw in self.client.lrange(f"{self.key}.starts", 0, -1):
            entry = json.loads(raw)
            out.setdefault(entry["field"], []).append(entry["started"])
        return out

    def counts(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.client.hgetall(f"{self.key}.runs").items()}

    def forget(self) -> None:
        self.client.delete(f"{self.key}.runs", f"{self.key}.done", f"{self.key}.starts")
        self.client.close()


def states(task_ids: list[str]) -> dict[str, str | None]:
    client = results_client()
    out: dict[str, str | None] = {}
    try:
        for start in range(0, len(task_ids), 500):
            chunk = task_ids[start:start + 500]
            raw = client.mget([f"celery-task-meta-{tid}" for tid in chunk])
            for tid, value in zip(chunk, raw):
                out[tid] = json.loads(value)["status"] if value else None
    finally:
        client.close()
    return out


def wait_all_succeeded(producer: Producer, timeout: float) -> dict[str, str | None]:
    ids = producer.ids()
    seen: dict[str, str | None] = {}

    def all_done() -> bool:
        seen.update(states([tid for tid in ids if seen.get(tid) != "SUCCESS"]))
        return all(seen.get(tid) == "SUCCESS" for tid in ids)

    with contextlib.suppress(AssertionError):
        wait_until(all_done, timeout, "every task to succeed", 0.5)
    return seen


@dataclass
class Tally:
    """Run counts against the ack policy, per task type."""

    sent: int = 0
    succeeded: int = 0
    missing: list[str] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)  # task type -> extra runs
    unsent_runs: int = 0  # runs of a send the producer saw fail (ambiguous sends)

    def line(self) -> str:
        dups = ", ".join(f"{name.rsplit('.', 1)[-1]} {n}" for name, n in
                         sorted(self.duplicates.items())) or "none"
        return (f"sent {self.sent}, succeeded {self.succeeded}, missing {len(self.missing)}, "
                f"extra runs (redeliveries): {dups}; runs of sends that reported an error: "
                f"{self.unsent_runs}")


def tally(producer: Producer, runs: Runs, seen: dict[str, str | None]) -> Tally:
    out = Tally(sent=len(producer.sent))
    out.succeeded = sum(1 for tid in producer.sent if seen.get(tid) == "SUCCESS")
    out.missing = [tid for tid in producer.sent if seen.get(tid) != "SUCCESS"]
    sent_fields = {f"{tid}:{attempt}" for tid, attempts in producer.sent.items()
                   for attempt, _ in attempts}
    for name in set(producer.kind_of.values()):
        out.duplicates[name] = 0
    for run_field, count in runs.counts().items():
        tid = run_field.rsplit(":", 1)[0]
        if run_field not in sent_fields:
            out.unsent_runs += count
            continue
        out.duplicates[producer.kind_of[tid]] += count - 1
    return out


# --------------------------------------------------------------------------
# Remote control and events after the faults
# --------------------------------------------------------------------------


def ping(app: Any, nodename: str) -> bool:
    try:
        replies = app.control.ping(destination=[nodename], timeout=1.0)
    except Exception:
        return False
    return any(nodename in reply for reply in replies or [])


class EventListener:
    """A real ``EventReceiver`` in a thread: the event types one worker sent."""

    def __init__(self, app: Any, hostname: str) -> None:
        self.app = app
        self.hostname = hostname
        self.types: set[str] = set()
        self._receiver: Any = None
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)

    def _on_event(self, event: dict) -> None:
        if event.get("hostname") == self.hostname:
            self.types.add(event["type"])

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self._receiver = self.app.events.Receiver(connection,
                                                      handlers={"*": self._on_event})
            with contextlib.suppress(Exception):
                self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> EventListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(5)


def assert_control_and_events(app: Any, worker: harness.WorkerProcess) -> None:
    """``ping`` answered and heartbeats and task events received, after the last fault."""
    took = wait_until(lambda: ping(app, worker.nodename), RESUME_BOUND,
                      f"{worker.nodename} to answer ping", interval=0.2)
    print(f"  ping answered {took:.1f}s after the check began")
    with EventListener(app, worker.nodename) as listener:
        wait_until(lambda: {"worker-heartbeat", "task-succeeded"} <= listener.types,
                   RESUME_BOUND, "worker-heartbeat and task-succeeded events", 0.1)


# --------------------------------------------------------------------------
# Scenario drivers
# --------------------------------------------------------------------------


@contextlib.contextmanager
def stream(kind: str, broker: harness.BrokerEnv, log_dir: Path, *, names: list[str],
           env: tuple = (), pool: str = "threads", concurrency: int = 4,
           extra_flags: tuple = (), producer_url: str | None = None):
    """A worker of ``kind`` and a producer feeding it (straight to the broker,
    ``producer_url``, when the worker's goes through a proxy); yields a dict."""
    queue = f"ccfault.{harness.new_token()}"
    key = f"ccfault.{harness.new_token()}"
    spec = FaultSpec(project=PROJECT, pool=pool, concurrency=concurrency,
                     extra_flags=extra_flags,
                     env=(("CC_TEST_QUEUE", queue), ("CC_TEST_CONFIRM", "1"), LIVENESS_ENV,
                          *env))
    ctx: dict[str, Any] = {"spec": spec, "queue": queue, "key": key, "workers": [],
                           "broker": broker}

    def start_worker() -> harness.WorkerProcess:
        worker = harness.WorkerProcess(kind, spec, broker, log_dir).start()
        ctx["workers"].append(worker)
        ctx["worker"] = worker
        worker.wait_ready()
        return worker

    ctx["start_worker"] = start_worker
    runs = ctx["runs"] = Runs(key)
    producer = None
    try:
        worker = start_worker()
        with harness.client_app(PROJECT, worker.env) as app:
            ctx["app"] = app
            producer = ctx["producer"] = Producer(
                app, producer_url or broker.url, key,
                [f"{PROJECT}.tasks.{n}" for n in names]).start()
            runs.first_completed_after(time.time(), RESUME_BOUND)  # steady state
            yield ctx
    finally:
        if producer is not None:
            producer._stop.set()
        for worker in ctx["workers"]:
            worker.stop()
        with contextlib.suppress(Exception):
            broker.forget_queue(queue.rsplit(".", 1)[-1], queue)
        runs.forget()


def finish(ctx: dict, faults: int, window: int, settle: float) -> Tally:
    """Stop sending; wait for every result; check run counts against the ack policy.

    ``window``: how many messages one fault may leave un-acked (the prefetch
    count): only those may run again.
    """
    producer: Producer = ctx["producer"]
    producer.stop()
    seen = wait_all_succeeded(producer, settle)
    result = tally(producer, ctx["runs"], seen)
    print(f"  {result.line()}; sends that failed and were retried: {producer.failed_sends}")
    worker = ctx["worker"]
    assert not result.missing, (
        f"{len(result.missing)} of {result.sent} tasks never succeeded, e.g. "
        f"{result.missing[:3]} (states {[seen.get(t) for t in result.missing[:3]]}; "
        f"{locate(ctx['broker'], ctx['queue'], result.missing[:3])}; "
        f"runs {[(f, n) for f, n in ctx['runs'].counts().items() if f[:36] in result.missing]})"
        f"\n" + worker.log_tail(80))
    extra = sum(result.duplicates.values())
    assert extra <= faults * window, (
        f"{extra} extra runs after {faults} faults: more than the {window} messages "
        f"one fault can leave un-acked\n" + worker.log_tail(80))
    return result


def locate(broker: harness.BrokerEnv, queue: str, ids: list[str]) -> str:
    """Where the messages of ``ids`` are on a Redis broker (a failure's diagnosis)."""
    if broker.name != "redis":
        return "broker not inspected"
    client = redis.Redis.from_url(broker.url)
    try:
        where: dict[str, list[str]] = {tid: [] for tid in ids}
        for key in client.scan_iter(match=f"{queue}*"):
            for raw in client.lrange(key, 0, -1):
                for tid in ids:
                    if tid.encode() in raw:
                        where[tid].append(f"list {key!r}")
        for tag, raw in client.hgetall("unacked").items():
            for tid in ids:
                if tid.encode() in raw:
                    score = client.zscore("unacked_index", tag)
                    age = None if score is None else round(time.time() - score, 1)
                    where[tid].append(f"unacked (tag {tag!r}, index age {age})")
        found = "; ".join(f"{tid}: {', '.join(places) or 'nowhere'}"
                          for tid, places in where.items())
        return f"{found}; kombu's unacked_mutex ttl {client.ttl('unacked_mutex')}"
    except redis.RedisError as exc:
        return f"broker not inspected: {exc!r}"
    finally:
        client.close()


def report(title: str, rows: list[tuple[str, float, float]]) -> None:
    print(f"\n{title}")
    for label, down, resume in rows:
        print(f"  {label}: down {down:.1f}s, back -> first task started after it "
              f"completed {resume:.2f}s")
    resumes = [row[2] for row in rows]
    print(f"  resume: min {min(resumes):.2f}s, max {max(resumes):.2f}s, "
          f"mean {sum(resumes) / len(resumes):.2f}s")


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(prefix="ccfault-") as path:
        yield Path(path)


@pytest.fixture
def own_redis(workdir, redis_available):
    server = RedisServer(workdir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def own_rabbit(workdir, redis_available):
    node = RabbitNode(workdir)
    node.start()
    try:
        yield node
    finally:
        node.kill()


# --------------------------------------------------------------------------
# (a) Redis restarted, (b) RabbitMQ restarted
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", fault_kinds())
def test_redis_restarts(kind, own_redis, interop_log_dir):
    """Redis killed with SIGKILL and restarted on its port, five times."""
    broker = harness.BrokerEnv("redis", own_redis.url())
    rows = []
    with stream(kind, broker, interop_log_dir, names=["late", "early"],
                env=(("CC_TEST_VT", str(VT)),)) as ctx:
        for i in range(RESTARTS):
            down_at = time.time()
            own_redis.kill()
            time.sleep(1.0)
            back_at = own_redis.start()
            resume = ctx["runs"].first_started_after(back_at, RESUME_BOUND)
            rows.append((f"restart {i + 1}", back_at - down_at, resume))
            time.sleep(1.0)
        report(f"[{kind}] Redis killed (SIGKILL) and restarted x{RESTARTS}", rows)
        assert_control_and_events(ctx["app"], ctx["worker"])
        result = finish(ctx, RESTARTS, window=16, settle=VT + 60)
        if kind == "ccworker":
            # Native Redis: the new connection settles what the lost one owed
            # (acks not sent, running tasks' messages), so nothing runs twice.
            assert sum(result.duplicates.values()) == 0, result.line()
        assert ctx["worker"].stop() == 0


@pytest.mark.parametrize("kind", fault_kinds())
def test_rabbitmq_restarts(kind, own_rabbit, interop_log_dir):
    """A RabbitMQ node killed with SIGKILL (odd rounds) or stopped with
    ``rabbitmqctl stop`` (even rounds), and started again, five times."""
    broker = harness.BrokerEnv("amqp", own_rabbit.url)
    rows = []
    with stream(kind, broker, interop_log_dir, names=["late", "early"]) as ctx:
        for i in range(RESTARTS):
            how = "SIGKILL" if i % 2 == 0 else "rabbitmqctl stop"
            down_at = time.time()
            if i % 2 == 0:
                own_rabbit.kill()
            else:
                own_rabbit.stop()
            back_at = own_rabbit.start()
            resume = ctx["runs"].first_started_after(back_at, RESUME_BOUND)
            rows.append((f"restart {i + 1} ({how})", back_at - down_at, resume))
            time.sleep(1.0)
        report(f"[{kind}] RabbitMQ node restarted x{RESTARTS}", rows)
        assert_control_and_events(ctx["app"], ctx["worker"])
        finish(ctx, RESTARTS, window=16, settle=60)
        assert ctx["worker"].stop() == 0


class MingleSpec(FaultSpec):
    """The fault flags with mingle on (the harness turns it off elsewhere)."""

    def flags(self, nodename: str) -> list[str]:
        return [f for f in super().flags(nodename) if f != "--without-mingle"]


def test_mingle_after_rabbitmq_restarts(own_rabbit, interop_log_dir):
    """ccworker only: after each RabbitMQ restart mingle's ``hello`` goes out on
    a new connection, and nothing warns. Under the fault streams' load it
    used to go through the app's producer pool, whose connection the
    restarted node had closed (``mingle: could not reach the other workers:
    ConnectionForced`` after every second reconnection), and the first
    reconnection logged py-amqp's ``AMQPDeprecationWarning`` about
    ``.transport`` (issue 19). This idle worker does not reproduce the pool
    failure (tests/unit/test_mingle.py shows that mechanism); it holds the
    behaviour after the fix: every reconnection mingles, quietly."""
    broker = harness.BrokerEnv("amqp", own_rabbit.url)
    spec = MingleSpec(project=PROJECT, pool="threads", concurrency=2)
    worker = harness.WorkerProcess("ccworker", spec, broker, interop_log_dir).start()
    def mingled() -> int:  # mingles that ended, either way
        log = worker.log()
        return log.count("mingle: all alone") + log.count("mingle: could not reach")

    try:
        worker.wait_ready()  # mingle goes on after ``ready.``: wait for its end
        assert harness.wait_until(lambda: mingled() == 1, 30), worker.log_tail()
        # A kill, then a stop: the second reconnection is the one that failed.
        for fault in (own_rabbit.kill, own_rabbit.stop):
            ended = mingled()
            fault()
            own_rabbit.start()
            assert harness.wait_until(lambda n=ended: mingled() > n, 60), worker.log_tail()
        log = worker.log()
        assert log.count("mingle: searching for neighbors") == 3, worker.log_tail()
        assert "could not reach" not in log and "Deprecation" not in log, worker.log_tail()
    finally:
        assert worker.stop() == 0


# --------------------------------------------------------------------------
# (c) the worker killed with SIGKILL and restarted
# --------------------------------------------------------------------------


def worker_kills(kind: str, broker: harness.BrokerEnv, log_dir: Path, env: tuple,
                 settle: float) -> None:
    rows = []
    kills: list[float] = []
    with stream(kind, broker, log_dir, names=["late"], env=env, pool="prefork",
                concurrency=2) as ctx:
        for i in range(RESTARTS):
            time.sleep(1.5)  # tasks running and reserved when the kill comes
            down_at = time.time()
            kills.append(down_at)
            ctx["worker"].kill()
            ctx["worker"].stop()
            ctx["start_worker"]()
            back_at = time.time()
            resume = ctx["runs"].first_started_after(back_at, RESUME_BOUND)
            rows.append((f"kill {i + 1}", back_at - down_at, resume))
        report(f"[{kind}] worker killed (SIGKILL) and restarted x{RESTARTS} "
               f"on {broker.name} (down = restart until ready)", rows)
        assert_control_and_events(ctx["app"], ctx["worker"])
        # prefork -c 2: 8 messages prefetched at most, plus the 2 running.
        result = finish(ctx, RESTARTS, window=10, settle=settle)
        redelivered = [d for d in ctx["runs"].done if d["redelivered"]]
        print(f"  completions of redelivered messages: {len(redelivered)} "
              f"(extra runs {sum(result.duplicates.values())})")
        # A run that began before a kill and began again after it: the
        # message of a task the kill interrupted, redelivered.
        delays: dict[int, list[float]] = {}
        for starts in ctx["runs"].starts().values():
            starts.sort()
            for before, again in zip(starts, starts[1:]):
                killed = [i for i, at in enumerate(kills) if before < at < again]
                if killed:
                    delays.setdefault(killed[0], []).append(again - kills[killed[0]])
        print("  kill -> interrupted tasks started again: " + ", ".join(
            f"{min(d):.1f}-{max(d):.1f}s ({len(d)})" for _, d in sorted(delays.items())))
        assert ctx["worker"].stop() == 0


@pytest.mark.parametrize("kind", fault_kinds())
def test_worker_sigkill_redis(kind, own_redis, interop_log_dir):
    """acks_late on Redis: the dead worker's messages come back after ``visibility_timeout``."""
    broker = harness.BrokerEnv("redis", own_redis.url())
    worker_kills(kind, broker, interop_log_dir, (("CC_TEST_VT", str(KILL_VT)),),
                 settle=KILL_VT + 60)


@pytest.mark.parametrize("kind", fault_kinds())
def test_worker_sigkill_rabbitmq(kind, amqp_broker_url, interop_log_dir):
    """acks_late on RabbitMQ: the dead worker's messages come back at once."""
    url, shared = amqp_broker_url
    broker = harness.BrokerEnv("amqp", url, fallback_shared_vhost=shared)
    worker_kills(kind, broker, interop_log_dir, (), settle=60)


# --------------------------------------------------------------------------
# Half-open connections: the peer goes silent without closing
# --------------------------------------------------------------------------


def half_open(kind: str, broker: harness.BrokerEnv, direct_url: str, proxy: BlackholeProxy,
              log_dir: Path, extra_flags: tuple, env: tuple) -> None:
    lost = "Connection to broker lost"
    with stream(kind, broker, log_dir, names=["late", "early"], env=env,
                extra_flags=extra_flags, producer_url=direct_url) as ctx:
        worker = ctx["worker"]
        rows = []
        for i in range(2):
            before = worker.log().count(lost)
            frozen_at = time.time()
            proxy.freeze()
            detected = wait_until(lambda n=before: worker.log().count(lost) > n, DETECT_BOUND,
                                  "the worker to notice the silent connection", 0.1)
            time.sleep(1.0)
            proxy.thaw()
            back_at = time.time()
            resume = ctx["runs"].first_started_after(back_at, RESUME_BOUND)
            print(f"  silence {i + 1}: noticed after {detected:.1f}s")
            rows.append((f"silence {i + 1}", back_at - frozen_at, resume))
        report(f"[{kind}] {broker.name} connection gone silent (half-open) x2", rows)
        assert_control_and_events(ctx["app"], worker)
        finish(ctx, 2, window=16, settle=VT + 60)
        assert worker.stop() == 0


@pytest.mark.parametrize("kind", fault_kinds())
def test_half_open_redis(kind, own_redis, interop_log_dir):
    """Busy and idle, the worker's Redis connections go silent: noticed, and recovered."""
    proxy = BlackholeProxy(own_redis.port).start()
    try:
        broker = harness.BrokerEnv("redis", f"redis://127.0.0.1:{proxy.port}/0")
        half_open(kind, broker, own_redis.url(), proxy, interop_log_dir, (),
                  (("CC_TEST_VT", str(VT)),))
    finally:
        proxy.close()


@pytest.mark.parametrize("kind", fault_kinds())
def test_half_open_rabbitmq(kind, amqp_broker_url, interop_log_dir):
    """AMQP heartbeats (``broker_heartbeat=2``) notice a silent RabbitMQ connection."""
    url, shared = amqp_broker_url
    port = int(re.search(r":(\d+)/", url).group(1))
    proxy = BlackholeProxy(port).start()
    try:
        proxied = url.replace(f":{port}/", f":{proxy.port}/")
        broker = harness.BrokerEnv("amqp", proxied, fallback_shared_vhost=shared)
        half_open(kind, broker, url, proxy, interop_log_dir, ("--", "broker_heartbeat=2"), ())
    finally:
        proxy.close()


# --------------------------------------------------------------------------
# broker_connection_retry, _on_startup, _max_retries: differential
# --------------------------------------------------------------------------

CONNECT_LINES = re.compile(
    r"(consumer: Cannot connect to .*|Trying again .*|Will retry using next failover.*"
    r"|.*Retrying to (?:re-)?establish a connection.*|.*Unrecoverable error: .*"
    r"|.*Connection to broker lost.*)")
LOG_PREFIX = re.compile(r"^\[[^\]]*: (\w+)/[^\]]*\] ")


def connect_lines(log: str, port: int) -> list[str]:
    """The worker's connection log lines: level and text, the port normalised."""
    out = []
    for line in log.splitlines():
        line = LOG_PREFIX.sub(r"\1 ", line)
        if CONNECT_LINES.search(line):
            out.append(line.replace(str(port), "<port>"))
    return out


def start_both(broker: harness.BrokerEnv, log_dir: Path, extra_flags: tuple,
               env: tuple = ()) -> dict[str, harness.WorkerProcess]:
    spec = harness.WorkerSpec(project=PROJECT, extra_flags=extra_flags,
                              env=(("CC_TEST_QUEUE", f"ccfault.{harness.new_token()}"), *env))
    return {kind: harness.WorkerProcess(kind, spec, broker, log_dir).start()
            for kind in harness.selected_kinds()}


def exited(worker: harness.WorkerProcess, timeout: float = 60) -> int:
    try:
        return worker.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{worker.kind} did not exit\n{worker.log_tail()}") from None
    finally:
        worker.stop()


@pytest.mark.parametrize("setting, expected", [
    ("broker_connection_retry_on_startup=False", "retry disabled"),
    ("broker_connection_max_retries=2", "retries exhausted"),
])
def test_startup_without_broker_gives_up(setting, expected, workdir, redis_available,
                                         interop_log_dir):
    """Broker down at start: retries off, or used up, end the worker with exit 1 and
    Celery's lines, on both kinds."""
    port = free_port()
    broker = harness.BrokerEnv("redis", f"redis://127.0.0.1:{port}/0")
    workers = start_both(broker, interop_log_dir, ("--", setting))
    observed = {}
    for kind, worker in workers.items():
        code = exited(worker)
        lines = connect_lines(worker.log(), port)
        # The traceback under "Unrecoverable error" is each worker's own.
        observed[kind] = (code, lines)
    print(json.dumps(observed, indent=1))
    harness.assert_same_across_kinds(observed)
    code, lines = next(iter(observed.values()))
    assert code == 1
    assert any(("Retrying to establish" in line) if expected == "retry disabled"
               else ("Unrecoverable error" in line) for line in lines)


def test_startup_waits_for_broker(own_redis, interop_log_dir):
    """Broker down at start (retry on startup, Celery's default): both kinds log
    Celery's retry lines, become ready once it is up, and stop at once on SIGTERM
    while still retrying (exit 0)."""
    own_redis.kill()
    broker = harness.BrokerEnv("redis", own_redis.url())
    waiting = start_both(broker, interop_log_dir, ())
    stopping = start_both(broker, interop_log_dir, ())
    for worker in [*waiting.values(), *stopping.values()]:
        wait_until(lambda w=worker: "Trying again in 2.00 seconds... (1/100)" in w.log(), 30,
                   f"{worker.kind} to log its first retry")
    codes = {}
    for worker in stopping.values():
        worker.request_stop()
    for kind, worker in stopping.items():
        codes[kind] = exited(worker, 15)
    harness.assert_same_across_kinds(codes)
    assert set(codes.values()) == {0}
    own_redis.start()
    try:
        for worker in waiting.values():
            worker.wait_ready()
            with harness.client_app(PROJECT, worker.env) as app:
                result = app.send_task(f"{PROJECT}.tasks.late", ("ccfault.startup", 0, 0.0))
                assert result.get(timeout=30) == 0
    finally:
        for worker in waiting.values():
            worker.stop()


def test_no_retry_after_loss(own_redis, interop_log_dir):
    """``broker_connection_retry=False``: a lost connection ends the worker (exit 1)."""
    broker = harness.BrokerEnv("redis", own_redis.url())
    workers = start_both(broker, interop_log_dir, ("--", "broker_connection_retry=False"))
    for worker in workers.values():
        worker.wait_ready()
    own_redis.kill()
    observed = {}
    for kind, worker in workers.items():
        code = exited(worker)
        lines = [line for line in connect_lines(worker.log(), own_redis.port)
                 if "Connection to broker lost" not in line]
        observed[kind] = (code, lines)
    print(json.dumps(observed, indent=1))
    harness.assert_same_across_kinds(observed)
    code, lines = next(iter(observed.values()))
    assert code == 1
    assert any("Retrying to re-establish" in line for line in lines), lines
