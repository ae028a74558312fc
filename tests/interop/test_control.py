"""Remote control, differential: what ``celery inspect``/``control`` and Flower get back.

Each side (``celery worker`` and ``ccworker``, threads pool, so the worker
answers while a task runs) is asked the same questions by a real client
(``app.control``) and by the real ``celery`` CLI, in the same state (a task
running, tasks reserved, an ETA task held). Replies are compared after
normalising what differs between any two workers: node names, pids, ids,
clocks, times, queue names, resource usage figures.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import time

import pytest
import redis

import harness
from celerycompat.celery_release import celery_version

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

PROJECT = "proj_basic"
TYPE_ONLY = {"eta", "pid", "clock", "uptime", "time_start", "worker_pid", "utime", "stime",
             "maxrss", "minflt", "majflt", "nvcsw", "nivcsw", "inblock", "oublock", "ixrss",
             "idrss", "isrss", "nswap", "msgsnd", "msgrcv", "nsignals", "port", "virtual_host"}


class Normaliser:
    def __init__(self, worker: harness.WorkerProcess, ids: list[str],
                 names: dict[str, str] | None = None):
        self.worker = worker
        self.ids = {task_id: f"<task{i}>" for i, task_id in enumerate(ids)}
        self.names = names or {}

    def text(self, value: str) -> str:
        value = value.replace(self.worker.nodename, "<node>")
        value = value.replace(self.worker.queue, "<queue>")
        for text, name in self.names.items():
            value = value.replace(text, name)
        for task_id, name in self.ids.items():
            value = value.replace(task_id, name)
        return re.sub(r"ccit\.record\.\w+", "<record>", value)

    def __call__(self, value, key=None):
        if key in TYPE_ONLY:
            return type(value).__name__
        if isinstance(value, dict):
            return {self.text(k) if isinstance(k, str) else k: self(v, k)
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        if isinstance(value, str):
            return self.text(value)
        return value


class Gate:
    """What ``proj_basic.tasks.gated`` waits on: a Redis list named for one
    worker, so its tasks run until the test has looked at them, however
    slowly a loaded machine lets it look."""

    def __init__(self, name: str, url: str):
        self.name = name
        self.client = redis.Redis.from_url(url)

    def open(self, tasks: int) -> None:
        """Let ``tasks`` gated tasks finish."""
        self.client.rpush(self.name, *[1] * tasks)
        self.client.expire(self.name, 60)


def gate_for(worker: harness.WorkerProcess) -> Gate:
    return Gate(f"ccit.gate.{worker.token}", worker.broker.results_url)


def ask(app, node: str, method: str, timeout: float = 10.0, **arguments):
    """The replies of ``node`` to ``method``. The client stops waiting at the
    first reply, so a generous ``timeout`` only costs time when none comes
    (then a loaded machine does not turn a slow reply into a missing one)."""
    replies = app.control.broadcast(method, arguments=arguments, destination=[node],
                                    reply=True, timeout=timeout)
    return [reply[node] for reply in replies if node in reply]


def cli(worker: harness.WorkerProcess, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "celery", "-A", PROJECT, *args, "-d", worker.nodename],
        cwd=str(harness.PROJECTS_DIR), env=worker.process_env(), capture_output=True,
        text=True, timeout=60)
    return f"exit {done.returncode}\n{done.stdout}{done.stderr}"


def observe(kind: str, broker: harness.BrokerEnv, log_dir) -> list:
    spec = harness.WorkerSpec(project=PROJECT, pool="threads", concurrency=2)
    worker = harness.WorkerProcess(kind, spec, broker, log_dir).start()
    out: list = []
    try:
        worker.wait_ready()
        with harness.client_app(PROJECT, worker.env) as app:
            node = worker.nodename
            # Two gated tasks fill both slots until the end, two more wait
            # reserved, one is held for an ETA.
            gate = gate_for(worker)
            running = [app.send_task("proj_basic.tasks.gated", (gate.name,)) for _ in range(2)]
            waiting = [app.send_task("proj_basic.tasks.add", (i, i)) for i in range(2)]
            eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=60)
            held = app.send_task("proj_basic.tasks.add", (9, 9), eta=eta)
            ids = [r.id for r in running + waiting + [held]]
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if len(ask(app, node, "active")[0]) == 2 and ask(app, node, "scheduled")[0]:
                    break
                time.sleep(0.1)
            norm = Normaliser(worker, ids, {gate.name: "<gate>"})

            def record(name, value):
                out.append([name, norm(value)])

            def record_sorted(name, infos):
                out.append([name, sorted(norm(infos), key=lambda info: info["id"])])

            record("ping", ask(app, node, "ping"))
            record("clock", ask(app, node, "clock"))
            record_sorted("active", ask(app, node, "active")[0])
            record_sorted("active safe", ask(app, node, "active", safe=True)[0])
            record_sorted("reserved", ask(app, node, "reserved")[0])
            record("scheduled", ask(app, node, "scheduled"))
            record("query_task", ask(app, node, "query_task", ids=ids + ["nope"]))
            record("registered", ask(app, node, "registered"))
            record("registered builtins", ask(app, node, "registered",
                                              taskinfoitems=["rate_limit"], builtins=True))
            record("active_queues", ask(app, node, "active_queues"))
            conf = ask(app, node, "conf")
            for reply in conf:
                # Celery rebuilds ``include`` from a set: its order is arbitrary.
                reply["include"] = sorted(reply.get("include") or [])
            record("conf", conf)
            record("stats keys", [list(r) for r in ask(app, node, "stats")])
            stats = ask(app, node, "stats")[0]
            record("stats", {k: stats[k] for k in ("pool", "broker", "prefetch_count",
                                                   "rusage", "pid", "clock", "uptime")})
            record("hello", ask(app, node, "hello", from_node="other@host", revoked=[]))
            record("hello self", ask(app, node, "hello", from_node=node))
            record("report keys", [sorted(r) for r in ask(app, node, "report")])
            record("memsample", [type(r).__name__ for r in ask(app, node, "memsample")])
            record("unknown", ask(app, node, "no_such_command"))
            record("bad arguments", ask(app, node, "ping", unexpected=object.__name__))
            record("enable_events", ask(app, node, "enable_events"))
            record("enable_events again", ask(app, node, "enable_events"))
            record("disable_events", ask(app, node, "disable_events"))
            record("disable_events again", ask(app, node, "disable_events"))
            record("heartbeat", ask(app, node, "heartbeat"))
            record("time_limit", ask(app, node, "time_limit", task_name="proj_basic.tasks.add",
                                     soft=10, hard=20))
            record("time_limit unknown", ask(app, node, "time_limit", task_name="nope",
                                             soft=1, hard=2))
            # ``election`` without gossip: Celery 5.7 answers with an AttributeError
            # from its idle Gossip step; ccworker (which runs no gossip yet) answers
            # null, as a worker without gossip should (docs/compat.md).
            election = ask(app, node, "election", id="e1", topic="none")
            assert election == ([None] if kind == "ccworker" else election)
            # Junk anyone could publish to the mailbox must not hurt either worker.
            # Celery before 5.7 leaves its old mailbox consumer behind when it
            # resets after a bad message, and answers nothing more: there the
            # reference is its worker without the junk, which ccworker (which
            # keeps 5.7's fix, docs/compat.md) must match with it.
            if kind == "ccworker" or not JUNK_SILENCES_CELERY_MAILBOX:
                send_junk(app, node)
            time.sleep(1.0)  # Celery resets its mailbox consumer after a bad message
            record("still alive", ask(app, node, "ping"))
            record("cli status", cli(worker, "status"))
            record("cli inspect ping", cli(worker, "inspect", "ping"))
            record("cli inspect registered", cli(worker, "inspect", "registered"))
            record("cli inspect active_queues --json",
                   json.loads(cli(worker, "inspect", "active_queues", "--json")
                              .split("\n", 1)[1]))
            gate.open(len(running))
            for result in running + waiting:
                result.get(timeout=30)
            record("shutdown", ask(app, node, "shutdown", timeout=3.0))
        worker.proc.wait(30)
        record("exit code", worker.proc.returncode)
    finally:
        worker.stop()
        broker.forget_queue(worker.token, worker.queue)
    return out


#: Celery before 5.7 stops answering its mailbox after a junk message
#: (its pidbox reset keeps the old consumer; fixed in 5.7).
JUNK_SILENCES_CELERY_MAILBOX = celery_version() < (5, 7)


def send_junk(app, node: str) -> None:
    """Messages anyone could publish to the mailbox: not a mapping, no method..."""
    with app.connection_for_write() as connection:
        exchange = app.control.mailbox.exchange
        producer = connection.Producer(exchange=exchange)
        for junk in ("not a mapping", {"no_method": 1}, ["a", "list"],
                     {"method": "ping", "arguments": "junk", "destination": [node]}):
            producer.publish(junk, exchange=exchange, routing_key="",
                             declare=[exchange], serializer="json")


def test_inspect_and_control_replies_match_celery(broker, interop_log_dir):
    kinds = harness.selected_kinds()
    observed = {kind: observe(kind, broker, interop_log_dir) for kind in kinds}
    first = dict((name, value) for name, value in observed[kinds[0]])
    assert first["ping"] == [{"ok": "pong"}]
    assert len(first["active"]) == 2 and len(first["scheduled"][0]) == 1
    assert first["shutdown"] == [] and first["exit code"] == 0
    harness.assert_same_across_kinds(observed)


def active_pids_are_pool_processes(kind: str, broker: harness.BrokerEnv, log_dir) -> list:
    """Two tasks running on ``-c 2`` and three more prefetched: ``inspect
    active`` lists the two with their children's pids, ``reserved`` the three,
    not started (ccworker's pool holds some of those ahead of a free child,
    as Celery's does: they are still reserved, not active)."""
    spec = harness.WorkerSpec(project=PROJECT, pool="prefork", concurrency=2)
    worker = harness.WorkerProcess(kind, spec, broker, log_dir).start()
    try:
        worker.wait_ready()
        with harness.client_app(PROJECT, worker.env) as app:
            gate = gate_for(worker)
            sent = [app.send_task("proj_basic.tasks.gated", (gate.name,)) for _ in range(5)]
            deadline = time.monotonic() + 15
            active: list = []
            reserved: list = []
            while time.monotonic() < deadline:
                active = ask(app, worker.nodename, "active")[0]
                reserved = ask(app, worker.nodename, "reserved")[0]
                if len(active) == 2 and all(info["worker_pid"] for info in active) \
                        and len(reserved) == 3:
                    break
                time.sleep(0.1)
            active = ask(app, worker.nodename, "active")[0]
            processes = ask(app, worker.nodename, "stats")[0]["pool"]["processes"]
            gate.open(len(sent))
            for result in sent:
                result.get(timeout=30)
        pids = sorted(info["worker_pid"] for info in active)
        not_started = all(info["time_start"] is None and info["worker_pid"] is None
                          and not info["acknowledged"] for info in reserved)
        return [len(active), all(pid in processes for pid in pids), len(set(pids)),
                len(reserved), not_started]
    finally:
        worker.stop()
        broker.forget_queue(worker.token, worker.queue)


def test_prefork_active_reports_the_child_pid(broker, interop_log_dir):
    """``inspect active``'s ``worker_pid`` is the pool child running the task (B38)."""
    for kind in harness.selected_kinds():
        assert active_pids_are_pool_processes(kind, broker, interop_log_dir) \
            == [2, True, 2, 3, True], kind


def test_prefork_revoke_takes_back_a_task_waiting_in_the_pool(broker, interop_log_dir):
    """ccworker's prefork pool holds a task ahead of a free child
    (``PreforkPool.queue_ahead``); revoking it takes it back, so it is
    discarded as a reserved one is and never runs (docs/compat.md: Celery's
    pool would run it). ``-c 1``: one task runs, the next waits in the pool,
    two more are reserved; the waiting one and the last are revoked."""
    if "ccworker" not in harness.selected_kinds():
        pytest.skip("ccworker-only test (CC_WORKERS excludes ccworker)")
    spec = harness.WorkerSpec(project=PROJECT, pool="prefork", concurrency=1)
    worker = harness.WorkerProcess("ccworker", spec, broker, interop_log_dir).start()
    try:
        worker.wait_ready()
        results = redis.Redis.from_url(broker.results_url)
        with harness.client_app(PROJECT, worker.env) as app:
            node = worker.nodename
            gate = gate_for(worker)
            slow = app.send_task("proj_basic.tasks.gated", (gate.name,))
            queued = [app.send_task("proj_basic.tasks.add", (i, i)) for i in range(3)]
            assert harness.wait_until(lambda: len(ask(app, node, "active")[0]) == 1
                              and len(ask(app, node, "reserved")[0]) == 3, 15), \
                worker.log_tail(30)
            ask(app, node, "revoke", task_id=[queued[0].id, queued[2].id])
            gate.open(1)
            slow.get(timeout=20)
            assert queued[1].get(timeout=20) == 2
            time.sleep(0.5)  # a revoked task that ran anyway would have stored by now
            states = [stored_status(results, queued[i].id, "REVOKED", timeout=5) for i in (0, 2)]
    finally:
        worker.stop()
        broker.forget_queue(worker.token, worker.queue)
    assert states == ["REVOKED", "REVOKED"], (states, worker.log_tail(30))


def revoke_scenario(kind: str, broker: harness.BrokerEnv, log_dir) -> list:

    spec = harness.WorkerSpec(project=PROJECT, pool="threads", concurrency=1)
    worker = harness.WorkerProcess(kind, spec, broker, log_dir).start()
    out: list = []
    try:
        worker.wait_ready()
        results = redis.Redis.from_url(broker.results_url)
        with harness.client_app(PROJECT, worker.env) as app:
            node = worker.nodename
            unknown = f"unknown-{worker.token}"
            gate = gate_for(worker)
            slow = app.send_task("proj_basic.tasks.gated", (gate.name,))
            queued = [app.send_task("proj_basic.tasks.add", (i, i)) for i in range(2)]
            eta = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=2)
            held = app.send_task("proj_basic.tasks.add", (5, 5), eta=eta)
            ids = [unknown, slow.id, queued[0].id, queued[1].id, held.id]
            norm = Normaliser(worker, ids)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not ask(app, node, "active")[0]:
                time.sleep(0.05)
            out.append(["revoke unknown", norm(ask(app, node, "revoke", task_id=unknown))])
            out.append(["revoke queued", norm(ask(app, node, "revoke", task_id=queued[0].id))])
            out.append(["revoke held", norm(ask(app, node, "revoke", task_id=[held.id]))])
            out.append(["revoke running", norm(ask(app, node, "revoke", task_id=slow.id))])
            out.append(["terminate unknown", norm(ask(app, node, "revoke", task_id="nope",
                                                      terminate=True))])
            gate.open(1)
            # Not slow.get(): Celery 5.6 stores REVOKED for the running task
            # too, which a client reading before its SUCCESS lands raises.
            assert stored_status(results, slow.id, "SUCCESS") == "SUCCESS"
            assert queued[1].get(timeout=20) == 2
            time.sleep(3)  # the ETA passes; the held task is discarded
            out.append(["inspect revoked", sorted(norm(ask(app, node, "revoked"))[0])])
            for name, task_id in (("unknown", unknown), ("slow", slow.id),
                                  ("queued", queued[0].id), ("held", held.id)):
                raw = results.get(f"celery-task-meta-{task_id}")
                text = re.sub(r'"date_done": "[^"]+"', '"date_done": "<date>"',
                              raw.decode() if raw else "<none>")
                out.append([f"meta {name}", norm.text(text)])
    finally:
        worker.stop()
        broker.forget_queue(worker.token, worker.queue)
    return out


def stored_status(results: redis.Redis, task_id: str, wanted: str, timeout: float = 20) -> str:
    """The stored state of ``task_id`` once it is ``wanted`` (or at ``timeout``)."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        raw = results.get(f"celery-task-meta-{task_id}")
        status = json.loads(raw)["status"] if raw else None
        if status == wanted:
            break
        time.sleep(0.05)
    return status


def test_revoke_matches_celery(broker, interop_log_dir):
    """B17-B20: revoked ids are discarded when they arrive or wait; 5.7 writes REVOKED at once."""
    kinds = harness.selected_kinds()
    observed = {kind: revoke_scenario(kind, broker, interop_log_dir) for kind in kinds}
    first = dict((name, value) for name, value in observed[kinds[0]])
    assert '"status": "REVOKED"' in first["meta held"]
    assert '"status": "SUCCESS"' in first["meta slow"]
    # Deliberate difference (docs/compat.md): Celery hands a prefetched task
    # to its pool as soon as it arrives, so revoking it while it waits for a
    # slot does not stop it (5.7 writes REVOKED, then the run overwrites it
    # with SUCCESS). ccworker checks the revoked set when a slot takes the
    # task, so a revoked task that has not started does not run.
    if "ccworker" in observed:
        cc = dict((name, value) for name, value in observed["ccworker"])
        assert '"status": "REVOKED"' in cc["meta queued"], cc["meta queued"]
    for kind in observed:
        observed[kind] = [entry for entry in observed[kind] if entry[0] != "meta queued"]
    harness.assert_same_across_kinds(observed)


class MingleSpec(harness.WorkerSpec):
    """The harness's flags with mingle left on: mingle is under test."""

    def flags(self, nodename: str) -> list[str]:
        return [flag for flag in super().flags(nodename) if flag != "--without-mingle"]


def test_mingle_merges_a_peers_revoked_ids(interop_log_dir, redis_available):
    """G4: a worker starting beside another learns its revoked ids and says so in its log."""
    broker = harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    peer = harness.WorkerProcess("celery", harness.WorkerSpec(project=PROJECT), broker,
                                 interop_log_dir).start()
    seen = {}
    try:
        peer.wait_ready()
        revoked_id = f"revoked-by-peer-{peer.token}"
        with harness.client_app(PROJECT, peer.env) as app:
            assert ask(app, peer.nodename, "revoke", task_id=revoked_id)
            for kind in harness.selected_kinds():
                worker = harness.WorkerProcess(kind, MingleSpec(project=PROJECT), broker,
                                               interop_log_dir).start()
                try:
                    worker.wait_ready()
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline and "mingle: sync" not in worker.log():
                        time.sleep(0.1)
                    log = worker.log()
                    seen[kind] = [
                        [line.split("] ", 1)[1] for line in log.splitlines()
                         if "mingle:" in line],
                        revoked_id in ask(app, worker.nodename, "revoked")[0],
                    ]
                finally:
                    worker.stop()
                    broker.forget_queue(worker.token, worker.queue)
    finally:
        peer.stop()
        broker.forget_queue(peer.token, peer.queue)
    for kind, value in seen.items():
        assert value == [["mingle: searching for neighbors", "mingle: sync with 1 nodes",
                          "mingle: sync complete"], True], (kind, value)


def consumer_scenario(kind: str, broker: harness.BrokerEnv, log_dir) -> list:
    spec = harness.WorkerSpec(project=PROJECT)
    worker = harness.WorkerProcess(kind, spec, broker, log_dir).start()
    out: list = []
    extra = f"{worker.queue}.extra"
    try:
        worker.wait_ready()
        with harness.client_app(PROJECT, worker.env) as app:
            node = worker.nodename
            norm = Normaliser(worker, [])
            def queue_names(until) -> list:
                # Celery applies add/cancel on its next loop turn, which on an
                # idle AMQP connection can come after the next request: poll.
                deadline = time.monotonic() + 10
                while True:
                    names = sorted(q["name"] for q in ask(app, node, "active_queues")[0])
                    if until(names) or time.monotonic() > deadline:
                        return norm(names)
                    time.sleep(0.2)

            out.append(["add_consumer", norm(ask(app, node, "add_consumer", queue=extra))])
            out.append(["queues after add", queue_names(lambda names: extra in names)])
            result = app.send_task("proj_basic.tasks.add", (1, 2), queue=extra)
            out.append(["task on the added queue", result.get(timeout=20)])
            out.append(["cancel_consumer", norm(ask(app, node, "cancel_consumer", queue=extra))])
            out.append(["queues after cancel", queue_names(lambda names: extra not in names)])
            app.send_task("proj_basic.tasks.add", (1, 2), queue=extra)
            time.sleep(1.0)
            out.append(["left in the cancelled queue", broker.queue_depth(extra)])
    finally:
        worker.stop()
        broker.forget_queue(worker.token, worker.queue)
        broker.forget_queue(worker.token, extra)
    return out


def test_add_and_cancel_consumer_match_celery(broker, interop_log_dir):
    """Flower's queue buttons: consume from one more queue, then stop (F11)."""
    observed = {kind: consumer_scenario(kind, broker, interop_log_dir)
                for kind in harness.selected_kinds()}
    first = dict((name, value) for name, value in next(iter(observed.values())))
    assert first["task on the added queue"] == 3
    assert first["left in the cancelled queue"] == 1
    harness.assert_same_across_kinds(observed)
