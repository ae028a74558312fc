"""Broker URLs beyond plain ``redis://`` and ``amqp://``, all through kombu
(issue 6): Redis Sentinel (``sentinel://``), Redis over TLS (``rediss://``)
and RabbitMQ over TLS (``amqps://``), the certificate verified against a CA
made for the test.

The test starts each server itself (a ``redis-server --sentinel`` watching
the local Redis, a TLS-only ``redis-server``, a RabbitMQ node with only a TLS
listener) and runs the same scenario on ``celery worker`` and ``ccworker``:
tasks and their results, a ``ping`` over the pidbox, the "Connected to" line
(the password masked as Celery masks it). On Redis both transports' paths
are used: the native fetch path and kombu's (pidbox, events).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import pytest
import redis
from kombu import Connection
from test_faults import RabbitNode, free_port, wait_until

import harness

pytestmark = [pytest.mark.interop, pytest.mark.serial, pytest.mark.timeout(300)]


# --------------------------------------------------------------------------
# Certificates and servers
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    """A CA, and a server certificate it signed for 127.0.0.1 and localhost."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is not on PATH: the TLS tests make their certificates with it")
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key",
        "-out", "ca.crt", "-days", "2", "-subj", "/CN=ccworker-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "ext.cnf")
    for name in ("ca.crt", "server.crt", "server.key"):
        (d / name).chmod(0o644)  # RabbitMQ's node may read them as another user
    return Certs(d / "ca.crt", d / "server.crt", d / "server.key")


def redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: these tests start their own")
    return binary


@contextlib.contextmanager
def process(argv: list[str], ready: Callable[[], bool], what: str, log: Path):
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{what} exited at start:\n"
                                     + log.read_text(errors="replace")[-2000:])
            return ready()

        wait_until(up, 30, what, interval=0.1)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        proc.wait(10)


def answers(client_factory: Callable[[], redis.Redis]) -> Callable[[], bool]:
    def check() -> bool:
        client = client_factory()
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()
    return check


# --------------------------------------------------------------------------
# Broker environments the harness can clean up after
# --------------------------------------------------------------------------


@dataclass
class AdminBrokerEnv(harness.BrokerEnv):
    """A `harness.BrokerEnv` whose URL a plain redis-py client cannot open:
    ``admin`` gives one for the same data (queue depth, clean-up)."""

    admin: Callable[[], redis.Redis] | None = None

    def redis_client(self) -> redis.Redis:
        assert self.admin is not None
        return self.admin()


# --------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------


def scenario(app, observe) -> None:
    results = [observe.send("add", (i, 10)) for i in range(3)]
    observe.record("results", [r.get(timeout=20) for r in results])
    node = observe.worker.nodename
    replies = app.control.ping(destination=[node], timeout=3.0)
    observe.record("ping", [{name: reply} for entry in replies for name, reply in entry.items()])
    connected = re.findall(r"Connected to (\S+)", observe.worker.log())
    observe.record("connected", connected[:1])


def run_both(run_differential, broker: harness.BrokerEnv, env: dict) -> tuple:
    # Fresh workers: the servers behind these URLs go away with the test.
    celery_obs, cc_obs = run_differential(scenario, broker, pool="threads", concurrency=2,
                                          env=env, fresh=True)
    assert celery_obs["results"] == [10, 11, 12]
    assert len(celery_obs["ping"]) == 1
    assert celery_obs == cc_obs
    return celery_obs, cc_obs


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_redis_sentinel(run_differential, redis_available, tmp_path):
    """``sentinel://`` with ``master_name``: the Sentinel names the local Redis
    as master, and both workers consume through it."""
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    master = urlsplit(harness.redis_base_url())
    conf.write_text(f"port {port}\nbind 127.0.0.1\n"
                    f"sentinel monitor ccmaster {master.hostname} {master.port or 6379} 1\n")
    argv = [redis_binary(), str(conf), "--sentinel"]
    with process(argv, answers(lambda: redis.Redis(port=port, socket_timeout=1)),
                 "redis sentinel", tmp_path / "sentinel.log"):
        broker = AdminBrokerEnv(
            "redis", f"sentinel://127.0.0.1:{port}/{harness.BROKER_DB}",
            admin=lambda: redis.Redis.from_url(harness.redis_db_url(harness.BROKER_DB)))
        celery_obs, _ = run_both(run_differential, broker, {
            "CC_TEST_TRANSPORT_OPTIONS": json.dumps({"master_name": "ccmaster"})})
    assert celery_obs["connected"] == [f"sentinel://:**@127.0.0.1:{port}/{harness.BROKER_DB}"]


def test_redis_tls(run_differential, certs, tmp_path):
    """``rediss://`` to a TLS-only Redis, its certificate checked against the CA."""
    port = free_port()

    def admin() -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, db=0, ssl=True,
                           ssl_ca_certs=str(certs.ca), socket_timeout=2)

    argv = [redis_binary(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key),
            "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no"]
    with process(argv, answers(admin), "TLS redis-server", tmp_path / "redis-tls.log"):
        broker = AdminBrokerEnv("redis", f"rediss://127.0.0.1:{port}/0", admin=admin)
        celery_obs, _ = run_both(run_differential, broker, {"CC_TEST_BROKER_CA": str(certs.ca)})
    assert celery_obs["connected"] == [f"rediss://:**@127.0.0.1:{port}/0"]


class TlsRabbitNode(RabbitNode):
    """test_faults's separate RabbitMQ node, listening on TLS only."""

    def __init__(self, workdir: Path, certs: Certs) -> None:
        super().__init__(workdir)
        (workdir / "rabbitmq.conf").write_text(
            "listeners.tcp = none\n"
            f"listeners.ssl.default = 127.0.0.1:{self.port}\n"
            f"ssl_options.cacertfile = {certs.ca}\n"
            f"ssl_options.certfile = {certs.cert}\n"
            f"ssl_options.keyfile = {certs.key}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
            "loopback_users = none\n")
        self.certs = certs

    @property
    def url(self) -> str:
        return f"amqps://guest:guest@127.0.0.1:{self.port}//"

    def accepts(self) -> bool:
        try:
            with Connection(self.url, connect_timeout=1, ssl={
                    "cert_reqs": ssl.CERT_REQUIRED, "ca_certs": str(self.certs.ca)}) as conn:
                conn.connect()
            return True
        except Exception:
            return False


def test_rabbitmq_tls(run_differential, certs, tmp_path, redis_available):
    """``amqps://`` to a RabbitMQ node whose only listener is TLS."""
    node = TlsRabbitNode(tmp_path, certs)
    node.start()
    try:
        broker = harness.BrokerEnv("amqp", node.url)
        celery_obs, _ = run_both(run_differential, broker, {"CC_TEST_BROKER_CA": str(certs.ca)})
    finally:
        node.stop()
    assert celery_obs["connected"] == [f"amqps://guest:**@127.0.0.1:{node.port}//"]
