"""The differential interop harness: one scenario, two workers, same observations.

A scenario is a function ``scenario(app, observe)`` written from a *client's*
point of view: it sends tasks with a real ``celery.Celery`` app and records
what a client (or an operator looking at Redis) can see through ``observe``.
``run_differential`` runs it once against ``celery worker`` and once against
``ccworker``, both real subprocesses started with the same flags on the same
broker, then normalises what differs by nature between two runs (task ids,
times, node names, pids, queue names, traceback paths) and returns both sets
of observations so the test can ``assert celery_obs == ccworker_obs``.

Why differential and not golden files: the reference is whatever the
installed Celery does *today*, on this broker, with this kombu; a golden file
would silently go stale when either changes. The wire captures in the shared
docs explain the format; the tests never read them.

Why stored results are compared as raw bytes: clients of other languages and
tools (Flower, ``redis-cli``, dashboards) read the JSON text, so key order,
spacing and escaping are part of the contract, not just the parsed value.

Layout of this module, top-down: configuration from the environment,
``BrokerEnv`` (where a test's broker and results live), ``WorkerProcess``
(one worker subprocess), ``WorkerCache`` (reuse of workers within a test
module), ``client_app`` (the client side), ``Observer`` (what a scenario
records), normalisation, ``Observations`` (comparison and diff), and
``run_differential``.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import hashlib
import importlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional
from urllib.parse import quote, urlsplit, urlunsplit

import redis
import redis_slots

try:
    from celery.exceptions import DuplicateTaskNameWarning
except ImportError:  # Celery < 5.6 (the version matrix): nothing to silence
    DuplicateTaskNameWarning = UserWarning

HERE = Path(__file__).resolve().parent
PROJECTS_DIR = HERE / "projects"
REPO_ROOT = HERE.parent.parent

WORKER_KINDS = ("celery", "ccworker")
#: ``celery2`` is a second, independent ``celery worker``: comparing celery
#: with itself (``CC_WORKERS=self``) proves the normalisation removes all
#: run-to-run noise, so a celery/ccworker difference is a real one.
ALL_KINDS = (*WORKER_KINDS, "celery2")

#: Redis databases, three per pytest process: the broker, the results and a
#: scratch db for the tests that FLUSHDB or need a db no worker of theirs
#: shares (mingle alone, the cluster script, the native result stores). The
#: broker and the results are kept apart (and away from db 0, which
#: developers use by hand) so a stray FLUSHDB in one never eats the other,
#: and so the tests can count broker keys without seeing results. Under
#: pytest-xdist each process of the run (``gw0``, ``gw1``, ...) gets its own
#: three (kombu prefixes its fanout channels, the pidbox and events, with the
#: db number, so broadcasts stay inside them too), on a Redis server of its
#: own past the fifth process (redis_slots.py); a run without xdist keeps
#: 10, 11 and 12, the defaults the test projects fall back to.
if redis_slots.needs_private_server():
    os.environ["CC_REDIS_URL"] = redis_slots.start_private_server()
BROKER_DB, RESULT_DB, SCRATCH_DB = redis_slots.databases()

READY_TIMEOUT = float(os.environ.get("CC_READY_TIMEOUT", "40"))
GET_TIMEOUT = float(os.environ.get("CC_GET_TIMEOUT", "20"))
STOP_TIMEOUT = float(os.environ.get("CC_STOP_TIMEOUT", "15"))

#: Raw values longer than this are shown as length + digest + head in
#: observations: still compared exactly (the digest), but a 1 MB line does not
#: drown the diff.
SUMMARISE_OVER = 4096


def redis_base_url() -> str:
    """``CC_REDIS_URL`` without a db path; the harness picks the dbs."""
    parts = urlsplit(os.environ.get("CC_REDIS_URL", "redis://127.0.0.1:6379"))
    return urlunsplit((parts.scheme, parts.netloc, "", "", ""))


def redis_db_url(db: int) -> str:
    return f"{redis_base_url()}/{db}"


def amqp_url() -> str:
    return os.environ.get("CC_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def amqp_url_with_vhost(vhost: str) -> str:
    parts = urlsplit(amqp_url())
    return urlunsplit((parts.scheme, parts.netloc, "/" + quote(vhost, safe=""), "", ""))


def selected_kinds() -> tuple[str, ...]:
    """Which sides run: ``CC_WORKERS`` = ``both`` (default), ``celery``, ``ccworker``.

    Running one side only is for bringing the harness up before ccworker
    exists (``celery``) and for debugging ccworker alone (``ccworker``); in
    both cases nothing is *compared*, which the session summary says loudly.
    ``self`` compares two independent celery workers: the harness's own
    test that normalisation leaves no run-to-run noise.
    """
    value = os.environ.get("CC_WORKERS", "both").strip().lower()
    if value in ("", "both", "all"):
        return WORKER_KINDS
    if value == "self":
        return ("celery", "celery2")
    if value in WORKER_KINDS:
        return (value,)
    raise ValueError(f"CC_WORKERS={value!r}: expected both, celery, ccworker or self")


def new_token() -> str:
    return uuid.uuid4().hex[:12]


# --------------------------------------------------------------------------
# Brokers
# --------------------------------------------------------------------------


def check_redis(url: str) -> Optional[str]:
    """``None`` if Redis answers PING at ``url``, else why not."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
        client.ping()
        client.close()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def check_amqp(url: str) -> Optional[str]:
    """``None`` if an AMQP connection opens at ``url``, else why not."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class RabbitVhost:
    """A throw-away RabbitMQ vhost for the whole test session.

    Why a vhost and not only unique queue names on ``/``: a worker declares
    more than its task queue (the default exchange of the queue, the reply
    and pidbox exchanges of the remote-control machinery, ``celeryev``), and
    a failing test can leave messages behind. A vhost per session makes all
    of it invisible to other sessions running in parallel (CI shards,
    several developers on one broker) and removes all of it in one call at
    the end, also after a crashed run's leftovers from being mistaken for
    this run's. Queue names are unique per worker inside the vhost anyway,
    so tests of one session never share a queue either.

    ``rabbitmqctl`` (or ``CC_RABBITMQCTL``, e.g. ``docker exec rmq
    rabbitmqctl``) is needed; where it is not available (a managed broker),
    the harness falls back to the vhost in ``CC_AMQP_URL`` with unique queue
    names and deletes the queues it used.
    """

    def __init__(self) -> None:
        self.name = f"ccinterop-{os.getpid()}-{new_token()[:6]}"
        self.created = False
        self.ctl = shlex.split(os.environ.get("CC_RABBITMQCTL", "rabbitmqctl"))

    @property
    def available(self) -> bool:
        return bool(self.ctl) and shutil.which(self.ctl[0]) is not None

    def _ctl(self, *args: str) -> None:
        subprocess.run([*self.ctl, *args], check=True, capture_output=True, timeout=60)

    def create(self) -> str:
        """Create the vhost and return the broker URL pointing at it."""
        user = urlsplit(amqp_url()).username or "guest"
        self._ctl("add_vhost", self.name)
        self.created = True
        self._ctl("set_permissions", "-p", self.name, user, ".*", ".*", ".*")
        return amqp_url_with_vhost(self.name)

    def delete(self) -> None:
        if self.created:
            with contextlib.suppress(Exception):
                self._ctl("delete_vhost", self.name)
            self.created = False


@dataclass
class BrokerEnv:
    """Where one broker flavour's tests send tasks and store results.

    ``name`` is ``redis`` or ``amqp``; ``url`` the broker URL the worker and
    the client both use. Results always go to the Redis result db (the
    backend most deployments use, and the one whose raw bytes we can read),
    except in scenarios that ask for ``rpc://``, which needs AMQP.
    """

    name: str
    url: str
    fallback_shared_vhost: bool = False

    @property
    def results_url(self) -> str:
        return redis_db_url(RESULT_DB)

    def backend_url(self, backend: str) -> str:
        if backend == "redis":
            return self.results_url
        if backend == "rpc":
            if self.name != "amqp":
                raise ValueError("rpc:// results need the amqp broker")
            return "rpc://"
        if backend.startswith("file://"):
            return backend  # a filesystem backend: a backend without native join
        raise ValueError(f"unknown backend {backend!r}")

    def connection(self):
        from kombu import Connection

        return Connection(self.url, connect_timeout=5)

    def redis_client(self) -> redis.Redis:
        """A plain client on the broker's Redis database (``name == "redis"``)."""
        return redis.Redis.from_url(self.url)

    def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting ones a worker holds unacked)."""
        if self.name == "redis":
            client = self.redis_client()
            try:
                return int(client.llen(queue))
            finally:
                client.close()
        with self.connection() as conn:
            channel = conn.channel()
            try:
                _, count, _ = channel.queue_declare(queue=queue, passive=True)
            except Exception:
                return -1
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
            return int(count)

    def forget_queue(self, token: str, queue: str) -> None:
        """Remove what a worker left on the broker (best effort)."""
        if self.name == "redis":
            client = self.redis_client()
            try:
                keys = list(client.scan_iter(match=f"*{token}*", count=1000))
                if keys:
                    client.delete(*keys)
            finally:
                client.close()
        elif self.fallback_shared_vhost:
            with contextlib.suppress(Exception), self.connection() as conn:
                conn.channel().queue_delete(queue)


# --------------------------------------------------------------------------
# Worker subprocesses
# --------------------------------------------------------------------------

_LIVE: set = set()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort if pytest dies between a start and its finalizer."""
    for worker in list(_LIVE):
        with contextlib.suppress(Exception):
            worker.kill()


@dataclass(frozen=True)
class WorkerSpec:
    """Everything that makes two workers interchangeable for a scenario.

    Scenarios with the same spec share a worker within a test module; the
    spec is also what ``run_differential`` takes as keyword arguments.
    ``{queue}`` in ``extra_flags`` stands for the worker's own queue name
    (``ccit.<kind>.<token>``), which differs per side: ``-Q {queue},{queue}.b``.
    """

    project: str = "proj_basic"
    backend: str = "redis"
    pool: str = "solo"
    concurrency: int = 1
    env: tuple = ()
    extra_flags: tuple = ()

    def flags(self, nodename: str) -> list[str]:
        """The worker flags, identical for both sides (``%h`` is expanded by
        the worker itself, which is part of what we test)."""
        return [
            "-l", "INFO",
            "-P", self.pool,
            "-c", str(self.concurrency),
            "-n", nodename,
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            *self.extra_flags,
        ]


class WorkerProcess:
    """One ``celery worker`` or ``ccworker`` subprocess and its log.

    The process runs in its own session (process group) so that stopping it
    also reaches any child it forked, and nothing else. Its stdout and
    stderr go to one log file, read for readiness and kept for assertions
    and failure reports.
    """

    def __init__(self, kind: str, spec: WorkerSpec, broker: BrokerEnv, log_dir: Path):
        if kind not in ALL_KINDS:
            raise ValueError(kind)
        self.kind = kind
        self.spec = spec
        self.broker = broker
        self.token = new_token()
        self.hostname = socket.gethostname()
        self.node_prefix = f"w{self.token}"
        self.nodename = f"{self.node_prefix}@{self.hostname}"
        self.queue = f"ccit.{kind}.{self.token}"
        self.record_key = f"ccit.record.{self.token}"
        self.log_path = log_dir / f"{kind}-{broker.name}-{self.token}.log"
        self.proc: Optional[subprocess.Popen] = None
        self._term_sent = False
        self.startup_records: list = []
        self.env = {
            "CC_TEST_BROKER": broker.url,
            "CC_TEST_BACKEND": broker.backend_url(spec.backend),
            "CC_TEST_QUEUE": self.queue,
            "CC_TEST_RECORD_URL": broker.results_url,
            "CC_TEST_RECORD": self.record_key,
            **dict(spec.env),
        }

    # -- command line ------------------------------------------------------

    def command(self) -> list[str]:
        # ``{queue}`` in ``extra_flags`` is this worker's own queue name, so
        # one spec can say ``-Q {queue},{queue}.second`` for both sides.
        flags = [f.replace("{queue}", self.queue)
                 for f in self.spec.flags(f"{self.node_prefix}@%h")]
        if self.kind in ("celery", "celery2"):
            return [sys.executable, "-m", "celery", "-A", self.spec.project, "worker", *flags]
        return [sys.executable, "-m", "celerycompat", "-A", self.spec.project, *flags]

    def process_env(self) -> dict:
        """The inherited environment minus anything that could configure
        Celery behind our back, plus the project's ``CC_TEST_*`` settings."""
        env = {
            k: v for k, v in os.environ.items()
            if not k.startswith(("CELERY_", "CC_TEST_", "PYTHONPATH"))
        }
        env.update(self.env)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        return env

    # -- lifecycle -----------------------------------------------------------

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            log.write(f"$ {shlex.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                # ``-A proj_basic`` resolves from the working directory, as
                # it does for a user running the command in their project.
                cwd=str(PROJECTS_DIR),
                env=self.process_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _LIVE.add(self)
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the log says ``<nodename> ready.``; fail with the log if
        the process exits first or ``timeout`` passes."""
        marker = f"{self.nodename} ready."
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log():
                self._collect_startup_records()
                return
            if not self.alive():
                raise WorkerFailed(self, f"exited with {self.proc.returncode} before ready")
            time.sleep(0.05)
        raise WorkerFailed(self, f"not ready after {timeout:g}s (no {marker!r} line)")

    def _collect_startup_records(self, timeout: float = 5.0) -> None:
        """Take (and clear) what the project recorded up to ``worker_ready``.

        Celery sends ``worker_ready`` just before logging ``ready.``; we still
        wait a little so a worker that logs first is not penalised for it,
        and a worker that never sends it costs only ``timeout``.
        """
        client = redis.Redis.from_url(self.broker.results_url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                raw = client.lrange(self.record_key, 0, -1)
                if any(b'"worker_ready"' in r for r in raw):
                    break
                time.sleep(0.05)
            pipe = client.pipeline(transaction=True)
            pipe.lrange(self.record_key, 0, -1)
            pipe.delete(self.record_key)
            raw, _ = pipe.execute()
            self.startup_records = [json.loads(r) for r in raw]
        finally:
            client.close()

    def recorded(self) -> list:
        """What the project recorded (``ccit_recorder``) since `startup_records`
        were taken (all of it if they never were), in order."""
        client = redis.Redis.from_url(self.broker.results_url)
        try:
            return [json.loads(r) for r in client.lrange(self.record_key, 0, -1)]
        finally:
            client.close()

    def request_stop(self) -> None:
        """SIGTERM (warm shutdown) without waiting, once: lets a caller stop
        many workers at the same time, then ``stop()`` each."""
        if self.proc is not None and self.proc.poll() is None and not self._term_sent:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            self._term_sent = True

    def stop(self, timeout: float = STOP_TIMEOUT) -> Optional[int]:
        """SIGTERM (warm shutdown), then SIGKILL to the group after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.request_stop()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with open(self.log_path, "ab") as log:
                    log.write(b"\n[harness] no exit after SIGTERM; SIGKILL\n")
                self.kill()
        self._reap_group()
        _LIVE.discard(self)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        _LIVE.discard(self)

    def _reap_group(self) -> None:
        """Children of the worker (e.g. prefork) that outlived it: kill them.
        Only our own process group is signalled."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    # -- log -------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="backslashreplace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def dump_stacks(self, timeout: float = 5.0) -> str:
        """Every thread's stack, from the worker itself: SIGUSR1 to its main
        process (both workers print Celery's ``cry`` on it), then what it
        wrote, without the locals. For a worker that stopped making progress."""
        if not self.alive():
            return "(not running)"
        offset = len(self.log())
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGUSR1)
        wait_until(lambda: "\nMainThread\n" in self.log()[offset:], timeout)
        time.sleep(0.2)  # the rest of the dump
        dump = self.log()[offset:]
        return re.sub(r"LOCAL VARIABLES\n=+\n.*?\n\n\n", "", dump, flags=re.S) or "(no dump)"

    def __repr__(self) -> str:
        return f"<WorkerProcess {self.kind} {self.nodename} pid={self.pid} {self.broker.name}>"


class WorkerFailed(AssertionError):
    """A worker did not start or died; carries its log so the cause is visible."""

    def __init__(self, worker: WorkerProcess, what: str):
        super().__init__(
            f"{worker.kind} worker {worker.nodename} {what}\n"
            f"command: {shlex.join(worker.command())}\n"
            f"log ({worker.log_path}):\n{worker.log_tail(120)}"
        )
        self.worker = worker


class WorkerStuck(WorkerFailed):
    """A live worker did not finish a task it was sent: its stacks are attached."""

    def __init__(self, worker: WorkerProcess, what: str):
        super().__init__(worker, f"{what}\nits threads (SIGUSR1):\n{worker.dump_stacks()}")


class WorkerCache:
    """Workers reused by the tests of one module, one per (kind, broker, spec).

    Starting a worker costs a second or two per side; a module of scenarios
    that all use the default spec thus starts four workers (two kinds, two
    brokers) instead of four per test. Tests stay isolated because each one
    sends tasks with fresh ids, waits for its own results, reads only its
    own records, and starts with a sentinel round-trip that proves the
    worker finished everything sent before. A worker found dead is replaced
    (the test that killed it has already failed on ``worker_alive``).
    """

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self._workers: dict = {}
        self.used: list[WorkerProcess] = []

    def get_many(self, kinds, broker: BrokerEnv, spec,
                 fresh: bool = False) -> dict:
        """Workers of every kind in ``kinds`` for ``spec`` (one ``WorkerSpec``,
        or a dict of one per kind), started together (their startups
        overlap) and all ready."""
        specs = spec if isinstance(spec, dict) else dict.fromkeys(kinds, spec)
        out, starting = {}, []
        for kind in kinds:
            spec = specs[kind]
            key = (kind, broker.name, spec)
            worker = None if fresh else self._workers.get(key)
            if worker is not None and not worker.alive():
                worker.stop()
                worker = None
            if worker is None:
                worker = WorkerProcess(kind, spec, broker, self.log_dir).start()
                starting.append(worker)
                if not fresh:
                    self._workers[key] = worker
            out[kind] = worker
            self.used.append(worker)
        try:
            for worker in starting:
                worker.wait_ready()
        except BaseException:
            for worker in starting:
                self.discard(worker)
            raise
        return out

    def discard(self, worker: WorkerProcess) -> None:
        worker.stop()
        worker.broker.forget_queue(worker.token, worker.queue)
        with contextlib.suppress(Exception):
            client = redis.Redis.from_url(worker.broker.results_url)
            client.delete(worker.record_key)
            client.close()
        for key, value in list(self._workers.items()):
            if value is worker:
                del self._workers[key]

    def release_fresh(self, workers: dict) -> None:
        for worker in workers.values():
            if worker not in self._workers.values():
                self.discard(worker)

    def close(self) -> None:
        workers = list(self._workers.values())
        # Warm shutdowns overlap: a module's workers stop in about the time
        # one takes, not one after the other.
        for worker in workers:
            worker.request_stop()
        for worker in workers:
            self.discard(worker)


# --------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------


@contextlib.contextmanager
def patched_environ(values: dict) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def client_app(project: str, env: dict):
    """A real ``celery.Celery`` client app for ``project`` configured by ``env``.

    The project package is imported afresh (its modules dropped from
    ``sys.modules`` first) with the worker's ``CC_TEST_*`` variables in
    ``os.environ``, so the client is configured by exactly the code the
    worker ran, not by a copy of it. Its modules stay importable afterwards:
    the client needs them to rebuild project exceptions from results.
    """
    if str(PROJECTS_DIR) not in sys.path:
        sys.path.insert(0, str(PROJECTS_DIR))
    for name in [m for m in sys.modules if m == project or m.startswith(project + ".")]:
        del sys.modules[name]
    with patched_environ(env), warnings.catch_warnings():
        # ``@app.task`` defaults to ``shared=True``: every task of an earlier
        # import is also added to every later app, so re-importing the
        # project warns about duplicate names. The callables are the same
        # code; the warning says nothing about the project.
        warnings.simplefilter("ignore", DuplicateTaskNameWarning)
        module = importlib.import_module(project)
        app = module.app
        app.loader.import_default_modules()
        app.finalize(auto=True)
    try:
        yield app
    finally:
        with contextlib.suppress(Exception):
            app.close()


# --------------------------------------------------------------------------
# Observations
# --------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """A JSON-able description of a value a client got back.

    JSON types stay as they are (``True`` stays distinct from ``1``); other
    types keep their type name and ``repr`` so a ``datetime`` decoded as a
    ``str`` shows as a difference.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, BaseException):
        cls = type(value)
        return {"exception": f"{cls.__module__}.{cls.__qualname__}", "args": plain(value.args)}
    return {"type": f"{type(value).__module__}.{type(value).__qualname__}", "repr": repr(value)}


def last_line(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


class Raw(str):
    """An observation that is raw bytes (decoded losslessly for display);
    compared byte for byte after normalisation, never re-serialised."""


def group_by_task(entries: list) -> list:
    """``entries`` stably reordered so each task's entries are adjacent, tasks
    in order of first appearance (entries without an id keep their own group)."""
    first_seen: dict = {}
    for entry in entries:
        first_seen.setdefault(entry[1].get("id"), len(first_seen))
    return sorted(entries, key=lambda entry: first_seen[entry[1].get("id")])


def kill_redis_connections(pid: int) -> int:
    """Close, server side, every Redis connection of process ``pid`` (CLIENT KILL).

    Only this worker's connections: their local ports are found through
    /proc, so other clients of the shared Redis are not touched.
    """
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    client = redis.Redis.from_url(redis_base_url())
    killed = 0
    try:
        for entry in client.client_list():
            if int(entry["addr"].rsplit(":", 1)[1]) in ports:
                killed += client.client_kill_filter(_id=entry["id"])
    finally:
        client.close()
    return killed


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists (signal 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0,
               interval: float = 0.05) -> Any:
    """``predicate()``'s first truthy value within ``timeout`` seconds, else
    its value at the deadline (a falsy one the caller asserts on)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


class Lines(list):
    """An observation rendered one compact JSON value per line: for ordered
    event lists (hook/signal records), where a diff should show whole
    events appearing, vanishing or moving."""


class Observer:
    """What a scenario uses to act as a client and record what it sees.

    Every ``record``-ing method appends ``(label, value)`` to the list that
    is later normalised and compared. Methods never raise on a behaviour
    difference (a timeout, a missing key): they record it, so the diff shows
    *what* differs instead of the first exception.
    """

    def __init__(self, app, worker: WorkerProcess, broker: BrokerEnv):
        self.app = app
        self.worker = worker
        self.broker = broker
        self.queue = worker.queue
        self.observations: list = []
        self.task_ids: list[str] = []
        #: Every AsyncResult the scenario sent (see `send`).
        self.sent: list = []
        self.results = redis.Redis.from_url(broker.results_url)
        self._log_offset = 0
        self._sentinels: list[str] = []

    # -- acting ---------------------------------------------------------------

    def task_name(self, name: str) -> str:
        return name if "." in name else f"{self.worker.spec.project}.tasks.{name}"

    def send(self, name: str, args=(), kwargs=None, by_name: bool = False, **options):
        """Send a task the way an application does: ``task.apply_async`` when the
        client knows the task, ``send_task`` otherwise (unknown names) or with
        ``by_name=True`` (arguments the client-side signature check refuses)."""
        full = self.task_name(name)
        task = None if by_name else self.app.tasks.get(full)
        if task is not None:
            result = task.apply_async(args, kwargs or {}, **options)
        else:
            result = self.app.send_task(full, args, kwargs or {}, **options)
        self.register_id(result.id)
        # Kept until the scenario ends: a result dropped by the scenario is
        # collected whenever, and Celery <= 5.4's Redis result consumer
        # deadlocks when that ``__del__`` unsubscribes in the middle of the
        # next send's subscribe (the matrix hung on it under Celery 5.4.0).
        self.sent.append(result)
        return result

    def register_id(self, task_id: str) -> str:
        """Declare an id the scenario created; ids get placeholders in this order."""
        if task_id not in self.task_ids:
            self.task_ids.append(task_id)
        return task_id

    def new_id(self) -> str:
        return self.register_id(str(uuid.uuid4()))

    def publish_raw(self, body: bytes, *, content_type: str, content_encoding: str = "utf-8",
                    headers: Optional[dict] = None, **properties) -> None:
        """Publish bytes to the worker's queue with kombu, bypassing Celery's
        message building (for malformed or foreign messages)."""
        from kombu import Producer

        with self.broker.connection() as conn:
            producer = Producer(conn.channel())
            producer.publish(
                body, exchange="", routing_key=self.queue,
                content_type=content_type, content_encoding=content_encoding,
                headers=headers or {}, serializer=None, retry=True, **properties,
            )

    def settle(self, timeout: float = GET_TIMEOUT) -> Any:
        """Round-trip a ``noop`` sentinel: with one queue consumed in order,
        once it is done every earlier message has been handled."""
        result = self.app.tasks[self.task_name("noop")].apply_async()
        self._sentinels.append(result.id)
        try:
            return result.get(timeout=timeout)
        except Exception as exc:
            return plain(exc)

    # -- recording ------------------------------------------------------------

    def record(self, label: str, value: Any) -> None:
        self.observations.append((label, value))

    def get(self, result, label: str, timeout: float = GET_TIMEOUT) -> Any:
        """``AsyncResult.get(propagate=False)``: value (or exception), state, the
        traceback's last line; a timeout is recorded, not raised."""
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            value = result.get(timeout=timeout, propagate=False)
        except CeleryTimeout:
            self.record(label, {"timeout": timeout, "state": result.state})
            return None
        self.record(label, {
            "value": plain(value),
            "state": result.state,
            "traceback_last": last_line(result.traceback),
        })
        return value

    def get_stored(self, task_id: str, label: str, timeout: float = GET_TIMEOUT) -> Any:
        """What `get` records, for a result the scenario did not send itself (a
        link callback, an errback), read from the backend once it is ready.

        Not ``app.AsyncResult(id).get()``: the client already holds another
        AsyncResult of that id (the signature's ``freeze()``, the parent's
        children) and Celery's Redis result consumer routes the publish to
        whichever it registered, so the new one's ``get()`` can time out
        with the result stored (seen on both workers under Celery 5.4 and 5.6).
        """
        from celery import states

        deadline = time.monotonic() + timeout
        while True:
            meta = self.app.backend.get_task_meta(task_id, cache=False)
            if meta["status"] in states.READY_STATES:
                break
            if time.monotonic() > deadline:
                self.record(label, {"timeout": timeout, "state": meta["status"]})
                return None
            time.sleep(0.02)
        self.record(label, {
            "value": plain(meta["result"]),
            "state": meta["status"],
            "traceback_last": last_line(meta.get("traceback")),
        })
        return meta["result"]

    def get_stored_and_meta(self, task_id: str, label: str) -> Any:
        value = self.get_stored(task_id, label)
        if self.worker.spec.backend == "redis":
            self.meta(task_id, label)
        return value

    def meta_raw(self, task_id: str) -> tuple:
        key = f"celery-task-meta-{task_id}"
        pipe = self.results.pipeline(transaction=True)
        pipe.get(key)
        pipe.ttl(key)
        raw, ttl = pipe.execute()
        return raw, ttl

    def meta(self, task_id: str, label: str) -> None:
        """The raw stored bytes of ``celery-task-meta-<id>`` and its TTL."""
        raw, ttl = self.meta_raw(task_id)
        self.record(label + ".raw", Raw(raw.decode("utf-8", "backslashreplace"))
                    if raw is not None else None)
        self.record(label + ".ttl", ttl_bucket(ttl))

    def get_and_meta(self, result, label: str, timeout: float = GET_TIMEOUT) -> Any:
        value = self.get(result, label, timeout)
        if self.worker.spec.backend == "redis":
            self.meta(result.id, label)
        return value

    def poll_meta(self, task_id: str, label: str, until=("SUCCESS", "FAILURE"),
                  timeout: float = GET_TIMEOUT) -> None:
        """Every distinct raw meta seen while polling (10 ms) until a state in
        ``until``; a leading 'absent' is dropped (whether the poll catches the
        key before the worker writes it is a race, not behaviour)."""
        seen: list = []
        deadline = time.monotonic() + timeout
        finished = False
        while time.monotonic() < deadline:
            raw, _ = self.meta_raw(task_id)
            if raw is not None and (not seen or seen[-1] != raw):
                seen.append(raw)
                status = json.loads(raw).get("status")
                if status in until:
                    finished = True
                    break
            time.sleep(0.01)
        # One observation per state, each raw, so normalisation sees the
        # stored JSON itself and not a JSON-escaped copy of it.
        self.record(label + ".count", len(seen))
        for i, raw in enumerate(seen):
            self.record(f"{label}[{i}]", Raw(raw.decode("utf-8", "backslashreplace")))
        if not finished:
            self.record(label + ".timeout", timeout)

    def queue_depth(self, label: str) -> None:
        self.record(label, self.broker.queue_depth(self.queue))

    def records(self, label: str, until: Optional[Callable] = None,
                timeout: float = 5.0, per_task: bool = False) -> list:
        """The hook/signal entries recorded since the scenario began, for this
        scenario's tasks (entries with another task's id are dropped).

        ``until(entries)`` says when the worker is done (default: every task
        that reached ``task_prerun`` also reached ``task_postrun``, the last
        thing Celery sends); after ``timeout`` whatever is there is recorded.

        ``per_task`` records each task's entries together, tasks in the order
        they first appear, keeping the order within each task. It is for
        scenarios where Celery's own interleaving of two tasks is a race: on
        gevent, Celery sends a timed-out task's ``task_failure`` from the
        timer greenlet after it has stored the result, so the client's next
        task can start first.
        """
        def default_until(entries):
            started = {e[1].get("id") for e in entries if e[0] == "task_prerun"}
            ended = {e[1].get("id") for e in entries if e[0] == "task_postrun"}
            return started <= ended

        until = until or default_until
        deadline = time.monotonic() + timeout
        entries: list = []
        while True:
            raw = self.results.lrange(self.worker.record_key, 0, -1)
            entries = [
                e for e in map(json.loads, raw)
                if "id" not in e[1] or e[1]["id"] in self.task_ids
            ]
            if until(entries) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if per_task:
            entries = group_by_task(entries)
        self.record(label, Lines(entries))
        return entries

    def log_problems(self, label: str,
                     normalise: Optional[Callable[[str], Optional[str]]] = None) -> None:
        """WARNING and worse log lines the worker wrote during the scenario, as
        ``LEVEL message`` (timestamps and process names removed). Operators
        see these; a replacement that stays silent, or shouts, differs.

        ``normalise(line)`` may rewrite a line (pids, sizes) or drop it (``None``)."""
        text = self.worker.log()[self._log_offset:]
        lines = []
        for match in re.finditer(
            r"^\[[^\]]*?: (WARNING|ERROR|CRITICAL)/[^\]]*\] (.*)$", text, re.M
        ):
            line = f"{match.group(1)} {match.group(2)}"
            if normalise is not None:
                line = normalise(line)
            if line is not None:
                lines.append(line)
        self.record(label, lines)

    # -- bracketing -------------------------------------------------------------

    def begin(self) -> None:
        # The sentinel proves the shared worker finished what earlier tests
        # sent; a worker that cannot is stuck, and every result of this
        # scenario would only time out: say so, with its stacks.
        sentinel = self.app.tasks[self.task_name("noop")].apply_async()
        self._sentinels.append(sentinel.id)
        try:
            sentinel.get(timeout=GET_TIMEOUT)
        except Exception as exc:
            raise WorkerStuck(self.worker, f"did not finish a sentinel task sent before "
                                           f"the scenario ({type(exc).__name__})") from exc
        self.results.delete(self.worker.record_key)
        self._log_offset = len(self.worker.log())

    def end(self) -> None:
        # Whether the worker survived the scenario is always observed.
        time.sleep(0.05)
        self.record("worker_alive", self.worker.alive())
        ids = self.task_ids + self._sentinels
        if ids:
            self.results.delete(*[f"celery-task-meta-{t}" for t in ids])
        self.results.close()


def ttl_bucket(ttl: Optional[int]) -> Any:
    """TTLs to the nearest minute: 86400 and 86399 are the same behaviour,
    ``-2`` (no key) and ``-1`` (no expiry) are named."""
    if ttl is None:
        return None
    if ttl == -2:
        return "absent"
    if ttl == -1:
        return "no-expiry"
    return f"~{round(ttl / 60) * 60}s"


# --------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------

UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DATE_DONE_RE = re.compile(r'("date_done": )"[^"]*"')
PID_RE = re.compile(r'("pid": )\d+')
ORIGIN_RE = re.compile(r"\bgen\d+@[A-Za-z0-9_.-]+")
TRACEBACK_RE = re.compile(r'("traceback": )"((?:[^"\\]|\\.)*)"')
DELIVERY_TAG_RE = re.compile(r'("delivery_tag": )(\d+|"[^"]*")')


@dataclass
class Normaliser:
    """Replaces what legitimately differs between two runs by placeholders.

    * task ids the scenario created -> ``<task-1>``... in creation order;
      any other UUID (reply queues, group ids) -> ``<uuid-1>``... in order
      of first appearance;
    * the worker's node name -> ``<nodename>``; a client origin
      ``gen<pid>@<host>`` -> ``<origin>``; the worker's queue -> ``<queue>``;
      its record list -> ``<record>``;
    * ``"date_done": "..."`` -> ``"<date>"`` (``null`` stays ``null``),
      ``"pid": N`` -> ``"<pid>"``, delivery tags -> ``"<tag>"``;
    * a stored traceback -> its last line (frames carry install paths and
      line numbers of the two implementations);
    * long raw values -> length, SHA-256 and head.

    Everything else, including key order and spacing of raw JSON, is kept.
    """

    task_ids: list
    nodename: str
    queue: str
    record_key: str
    pid: Optional[int] = None
    _other: dict = field(default_factory=dict)

    def text(self, s: str) -> str:
        ids = {t: f"<task-{i + 1}>" for i, t in enumerate(self.task_ids)}

        def uuid_sub(m):
            value = m.group(0)
            if value in ids:
                return ids[value]
            if value not in self._other:
                self._other[value] = f"<uuid-{len(self._other) + 1}>"
            return self._other[value]

        s = s.replace(self.nodename, "<nodename>")
        s = s.replace(self.record_key, "<record>")
        s = s.replace(self.queue, "<queue>")
        s = UUID_RE.sub(uuid_sub, s)
        s = ORIGIN_RE.sub("<origin>", s)
        s = DATE_DONE_RE.sub(r'\1"<date>"', s)
        s = PID_RE.sub(r'\1"<pid>"', s)
        s = DELIVERY_TAG_RE.sub(r'\1"<tag>"', s)
        s = TRACEBACK_RE.sub(self._traceback, s)
        return s

    @staticmethod
    def _traceback(m) -> str:
        segments = [seg for seg in m.group(2).split("\\n") if seg.strip()]
        last = segments[-1] if segments else ""
        return f'{m.group(1)}"<traceback ...> {last}"'

    def value(self, v: Any) -> str:
        """One observation as normalised text: raw values as they are,
        structured ones as indented JSON (so diffs are per line)."""
        if isinstance(v, Raw):
            text = self.text(str(v))
        elif isinstance(v, Lines):
            text = "\n".join(
                self.text(json.dumps(e, ensure_ascii=False, default=repr)) for e in v
            ) or "(none)"
        else:
            text = self.text(json.dumps(v, indent=1, ensure_ascii=False, default=repr))
        if len(text) > SUMMARISE_OVER:
            digest = hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()
            text = f"<{len(text)} chars sha256={digest[:24]} head={text[:160]!r}>"
        return text


@dataclass
class Observations:
    """Normalised ``(label, text)`` pairs from one side; ``==`` compares them
    in order, and ``diff()`` renders a unified diff for failure messages."""

    kind: str
    items: list
    log_path: str = ""

    def __eq__(self, other) -> bool:
        if not isinstance(other, Observations):
            return NotImplemented
        return self.items == other.items

    __hash__ = None  # type: ignore[assignment]

    def __getitem__(self, label: str) -> Any:
        """The first observation called ``label``, parsed back from JSON if it
        is structured (for sanity assertions on one side)."""
        for key, text in self.items:
            if key == label:
                try:
                    return json.loads(text)
                except ValueError:
                    return text
        raise KeyError(label)

    def labels(self) -> list:
        return [k for k, _ in self.items]

    def lines(self) -> list:
        out = []
        for label, text in self.items:
            body = text.splitlines() or [""]
            out.append(f"{label}: {body[0]}")
            out.extend(f"{' ' * (len(label) + 2)}{line}" for line in body[1:])
        return out

    def summary(self, other: Observations) -> list:
        """One short line per differing label: what fits in pytest's
        truncated assertion message (the full diff goes in a report section)."""
        mine, theirs = dict(self.items), dict(other.items)
        out = []
        for label in dict.fromkeys([*mine, *theirs]):
            a, b = mine.get(label), theirs.get(label)
            if a == b:
                continue
            if a is None or b is None:
                out.append(f"{label}: only in {self.kind if b is None else other.kind}")
                continue
            i = next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            out.append(f"{label}: {self.kind} {a[max(0, i - 20):i + 40]!r} "
                       f"vs {other.kind} {b[max(0, i - 20):i + 40]!r}")
        return out

    def diff(self, other: Observations) -> str:
        lines = list(difflib.unified_diff(
            self.lines(), other.lines(), fromfile=self.kind, tofile=other.kind, lineterm="", n=3,
        ))
        hints = []
        mine, theirs = dict(self.items), dict(other.items)
        for label in mine:
            a, b = mine[label], theirs.get(label)
            if b is not None and a != b and "\n" not in a and "\n" not in b:
                i = next((n for n, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                hints.append(f"{label}: first difference at char {i}: "
                             f"{self.kind} {a[max(0, i - 30):i + 50]!r} vs "
                             f"{other.kind} {b[max(0, i - 30):i + 50]!r}")
        logs = f"logs: {self.kind}={self.log_path}  {other.kind}={other.log_path}"
        return "\n".join([*lines, *hints, logs])


def normalise(observer: Observer) -> Observations:
    worker = observer.worker
    norm = Normaliser(task_ids=observer.task_ids, nodename=worker.nodename,
                      queue=worker.queue, record_key=worker.record_key, pid=worker.pid)
    items = [(label, norm.value(value)) for label, value in observer.observations]
    return Observations(worker.kind, items, str(worker.log_path))


# --------------------------------------------------------------------------
# The differential run
# --------------------------------------------------------------------------


#: The observations of the latest ``run_differential`` call, so the pytest
#: hook can attach the full diff to a failed test's report.
LAST_RESULTS: list = []


def run_side(kind: str, worker: WorkerProcess, scenario: Callable) -> Observations:
    """Run ``scenario`` as a client of ``worker``; a scenario crash is a
    failure carrying the worker's log."""
    with client_app(worker.spec.project, worker.env) as app:
        observer = Observer(app, worker, worker.broker)
        try:
            observer.begin()
            scenario(app, observer)
            observer.end()
        except AssertionError:
            raise
        except Exception as exc:
            raise WorkerFailed(worker, f"scenario raised {type(exc).__name__}: {exc}") from exc
        if worker.spec.backend == "rpc":
            # The rpc backend keeps one reply consumer per app; drain it.
            with contextlib.suppress(Exception):
                app.backend.result_consumer.stop()
    return normalise(observer)


def run_differential(scenario: Callable, broker: BrokerEnv, *, cache: WorkerCache,
                     fresh: bool = False, **worker_flags) -> tuple:
    """Run ``scenario(app, observe)`` on ``celery worker`` and on ``ccworker``.

    ``worker_flags`` build the ``WorkerSpec`` (``pool``, ``concurrency``,
    ``backend``, ``env`` as a dict, ``extra_flags``); both sides get the same,
    except what ``by_kind`` overrides for one side: ``by_kind={"celery":
    {"pool": "prefork"}}`` compares ccworker on the given pool with ``celery
    worker -P prefork`` (for behaviour Celery has on one pool only; the
    ``celery2`` of ``CC_WORKERS=self`` takes ``celery``'s overrides; an
    ``env`` dict there adds to the common one).
    ``fresh=True`` starts dedicated workers for this scenario (for what
    happens at startup); otherwise workers are shared within the module.

    Returns ``(celery_obs, ccworker_obs)`` (with ``CC_WORKERS=self``, two
    celery workers' observations). When ``CC_WORKERS`` selects one
    side, that side's observations are returned twice: the test then checks
    the harness and the scenario, and the session summary says no comparison
    was made.
    """
    env = worker_flags.pop("env", None) or {}
    by_kind = worker_flags.pop("by_kind", None) or {}
    kinds = selected_kinds()

    def spec_for(kind: str) -> WorkerSpec:
        flags = {**worker_flags, **by_kind.get("celery" if kind == "celery2" else kind, {})}
        side_env = {**env, **flags.pop("env", {})}
        return WorkerSpec(env=tuple(sorted(side_env.items())), **flags)

    specs = {kind: spec_for(kind) for kind in kinds}
    workers = cache.get_many(kinds, broker, specs, fresh=fresh)
    try:
        results = {kind: run_side(kind, workers[kind], scenario) for kind in kinds}
    except WorkerStuck as stuck:
        cache.discard(stuck.worker)  # the next test gets a new one
        raise
    finally:
        if fresh:
            cache.release_fresh(workers)
    dump_dir = os.environ.get("CC_DUMP_DIR")
    if dump_dir:
        # For reading what a scenario observes (and for bug reports): one
        # file per test, broker and side, the text that is compared.
        test = os.environ.get("PYTEST_CURRENT_TEST", "scenario").split(" ")[0]
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", test.split("::")[-1])
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        for kind, obs in results.items():
            Path(dump_dir, f"{stem}.{kind}.txt").write_text("\n".join(obs.lines()) + "\n")
    LAST_RESULTS[:] = list(results.values())
    if len(kinds) == 1:
        only = results[kinds[0]]
        return only, only
    return results[kinds[0]], results[kinds[1]]


def assert_same_across_kinds(observed: dict) -> None:
    """For tests that collect their own observations per worker kind: the
    first two kinds must have observed the same thing (a JSON diff if not)."""
    kinds = list(observed)
    if len(kinds) < 2:
        return
    left, right = (json.dumps(observed[kind], indent=1, default=str).splitlines()
                   for kind in kinds[:2])
    diff = "\n".join(difflib.unified_diff(left, right, kinds[0], kinds[1], lineterm=""))
    assert left == right, diff


def default_log_dir() -> Path:
    """Where worker logs go: ``CC_LOG_DIR`` or a per-session temp dir (kept, so
    the paths printed on failure still work after the run)."""
    configured = os.environ.get("CC_LOG_DIR")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix="ccinterop-logs-"))
