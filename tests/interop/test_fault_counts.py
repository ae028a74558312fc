"""Faults counted exactly, side by side with ``celery worker`` (issue 19, item 5).

Each scenario runs a ccworker and a ``celery worker`` of the installed
Celery at the same time, each on its own queue with its own producer (a
steady stream of ``late`` (``acks_late``) and ``early`` tasks of 0.1 s, from
test_faults.py), and hits both with the same fault five times:

* ``kill``: the whole worker (its process group) killed with SIGKILL under
  load and restarted; Redis, ``visibility_timeout`` 4 s (and once with the
  broker on a Redis server of its own, where acks cannot ride with results);
* ``redis-cut``: every Redis connection of the worker's processes (task
  fetching, pub/sub, results, prefork children's) closed by the server
  (``CLIENT KILL``);
* ``amqp-close``: every connection of the test's RabbitMQ vhost closed by
  the broker (``rabbitmqctl close_all_connections``).

Every task records each of its runs in Redis (proj_faults/tasks.py), so the
counts are exact, and the scenario then tallies, per worker and task type:

* ``lost``: sent, never SUCCESS. ``acks_late`` promises none; an early-ack
  task running at a kill is lost by design (at most once), for both workers;
* ``extra runs``: runs beyond the first of one publish;
* ``after success``: runs that began when the task's SUCCESS was stored
  already: its client had its result, and the message came back anyway;
* ``unstored``: the worker logged ``succeeded`` and no result was stored
  (the message was acked, so nobody will ever store one).

ccworker must never be worse than Celery on any count, and holds these
outright: no ``acks_late`` task lost; no run after a stored SUCCESS (broker
and results share the Redis server here, so a result and its ack are one
write: backends/riding_acks.py); nothing unstored; no extra run at all after
a Redis connection cut; on RabbitMQ, the first task sent after a close
starts within half a second. The tables print with ``-s``; docs/reliability.md
has the figures.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
from test_faults import RedisServer, Runs, states, stream, wait_until

import harness

# Not ``serial``: everything faulted is the test's own (its workers, their
# Redis connections by pid, its pytest process's vhost, its own Redis
# server), and every assertion is a count that holds by construction or a
# comparison, not a time, except the RabbitMQ resume (0.5 s against 0.01 s
# measured).
pytestmark = [pytest.mark.interop, pytest.mark.timeout(300)]

FAULTS = 5
#: Seconds of load before each fault.
LOAD = 1.2
KILL_VT = "4"
VT = "10"
#: ccworker's resume on RabbitMQ: first task sent after a close -> its start.
AMQP_RESUME_BOUND = 0.5
POOLS = [("prefork", 2), ("threads", 4)]
KINDS = ("ccworker", "celery")
SUCCEEDED = re.compile(r"Task proj_faults\.tasks\.(?:late|early)\[([0-9a-f-]{36})\] succeeded")


@dataclass
class Count:
    sent: int = 0
    lost: int = 0
    extra_runs: int = 0
    after_success: int = 0


@dataclass
class Tally:
    by_task: dict[str, Count] = field(default_factory=dict)
    unstored: int = 0
    resumes: list[float] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(getattr(count, name) for count in self.by_task.values())

    def row(self) -> str:
        parts = [f"{task}: sent {c.sent}, lost {c.lost}, extra runs {c.extra_runs}, "
                 f"after success {c.after_success}" for task, c in sorted(self.by_task.items())]
        resume = (f"; resume {min(self.resumes):.2f}-{max(self.resumes):.2f}s"
                  if self.resumes else "")
        return "; ".join(parts) + f"; unstored {self.unstored}{resume}"


def tree_pids(root: int) -> list[int]:
    """``root`` and every process below it (prefork children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cut_redis(ctx: dict) -> None:
    for pid in tree_pids(ctx["worker"].pid):
        with contextlib.suppress(OSError, ValueError):
            harness.kill_redis_connections(pid)


def restart_killed(ctx: dict) -> None:
    ctx["worker"].kill()
    ctx["worker"].stop()
    ctx["start_worker"]()


def tally(ctx: dict, settle: float) -> Tally:
    """Stop sending, wait for the results, and count (module docstring)."""
    producer = ctx["producer"]
    producer.stop()
    ids = producer.ids()
    seen: dict[str, Any] = {}

    def settled() -> bool:
        seen.update(states([tid for tid in ids if seen.get(tid) != "SUCCESS"]))
        return all(seen.get(tid) == "SUCCESS" or producer.kind_of[tid].endswith("early")
                   for tid in ids)

    with contextlib.suppress(AssertionError):
        wait_until(settled, settle, "acks_late tasks to succeed", 0.5)
    time.sleep(1.0)  # early-ack tasks redelivered by a cut finish too
    seen.update(states([tid for tid in ids if seen.get(tid) != "SUCCESS"]))
    runs: Runs = ctx["runs"]
    counts = runs.counts()
    after = {k.decode(): int(v) for k, v in
             runs.client.hgetall(f"{runs.key}.after_success").items()}
    out = Tally()
    sent_fields = {f"{tid}:{attempt}": tid for tid, attempts in producer.sent.items()
                   for attempt, _ in attempts}
    for tid in ids:
        count = out.by_task.setdefault(producer.kind_of[tid].rsplit(".", 1)[-1], Count())
        count.sent += 1
        count.lost += seen.get(tid) != "SUCCESS"
    for run_field, n in counts.items():
        tid = sent_fields.get(run_field)
        if tid is not None:
            count = out.by_task[producer.kind_of[tid].rsplit(".", 1)[-1]]
            count.extra_runs += n - 1
            count.after_success += after.get(run_field, 0)
    logged = set()
    for worker in ctx["workers"]:
        logged.update(SUCCEEDED.findall(worker.log()))
    out.unstored = sum(1 for tid in logged if tid in seen and seen[tid] != "SUCCESS")
    return out


@contextlib.contextmanager
def side_by_side(broker: harness.BrokerEnv, log_dir, pool: str, concurrency: int,
                 env: tuple):
    with contextlib.ExitStack() as stack:
        sides = {kind: stack.enter_context(
            stream(kind, broker, log_dir, names=["late", "early"], env=env, pool=pool,
                   concurrency=concurrency)) for kind in KINDS}
        yield sides


def compare(title: str, tallies: dict[str, Tally], same_redis: bool = True) -> None:
    """Print both rows; ccworker never worse, and the module's absolutes.

    ``same_redis``: results and broker on one Redis server, where a result
    and its ack are one write. On RabbitMQ an ``acks_late`` task running at
    a close stores its SUCCESS and is redelivered anyway (its ack had no
    channel left), for any worker: there, ``after success`` is compared only.
    """
    print(f"\n{title}")
    for kind in KINDS:
        print(f"  {kind}: {tallies[kind].row()}")
    ours, celery = tallies["ccworker"], tallies["celery"]
    assert ours.by_task["late"].lost == 0, "an acks_late task was lost"
    assert ours.unstored == 0, "a task logged 'succeeded' has no stored result"
    if same_redis:
        assert ours.total("after_success") == 0, "a task ran again after its SUCCESS was stored"
    assert ours.by_task["late"].lost <= celery.by_task["late"].lost
    assert ours.unstored <= celery.unstored


def logs_clean(ctx: dict) -> None:
    log = "".join(worker.log() for worker in ctx["workers"])
    for bad in ("could not reach the other workers", "DeprecationWarning", "Traceback",
                "Unrecoverable error"):
        assert bad not in log, f"{bad!r} in the worker's log:\n" + ctx["worker"].log_tail(60)


@pytest.fixture
def redis_same_server(redis_available) -> harness.BrokerEnv:
    """The shared Redis, broker and results on one server (two databases)."""
    return harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))


def inject(sides: dict, fault: Callable[[dict], None]) -> None:
    """``fault(sides)`` ``FAULTS`` times, ``LOAD`` seconds of load before each."""
    for _ in range(FAULTS):
        time.sleep(LOAD)
        fault(sides)


def kill_and_restart(sides: dict) -> None:
    for ctx in sides.values():
        ctx["worker"].kill()
    for ctx in sides.values():
        ctx["worker"].stop()
        ctx["start_worker"]()


def counted(title: str, broker: harness.BrokerEnv, log_dir, pool: str, concurrency: int,
            env: tuple, fault: Callable[[dict], None], settle: float,
            same_redis: bool = True,
            more: Callable[[dict, dict], None] | None = None) -> dict[str, Tally]:
    """One scenario: both workers under load, ``fault`` injected, counted
    (``more(sides, tallies)`` adds to the counts) and compared."""
    with side_by_side(broker, log_dir, pool, concurrency, env) as sides:
        inject(sides, fault)
        tallies = {kind: tally(ctx, settle) for kind, ctx in sides.items()}
        if more is not None:
            more(sides, tallies)
        compare(f"{title}, {pool} -c {concurrency}", tallies, same_redis)
        for ctx in sides.values():
            assert ctx["worker"].alive(), ctx["worker"].log_tail(60)
        logs_clean(sides["ccworker"])
    return tallies


@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_sigkill_counted(pool, concurrency, redis_same_server, interop_log_dir):
    counted(f"worker SIGKILL x{FAULTS}, Redis", redis_same_server, interop_log_dir, pool,
            concurrency, (("CC_TEST_VT", KILL_VT),), kill_and_restart, float(KILL_VT) + 40)


@pytest.fixture
def other_redis(redis_available, tmp_path):
    """A Redis server of the test's own: a broker that is not the results' server."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield harness.BrokerEnv("redis", server.url())
    finally:
        server.kill()


def test_sigkill_counted_other_redis(other_redis, interop_log_dir):
    """Broker and results on two Redis servers: acks cannot ride with
    results, so an early ack waits for the run to say it is due
    (riding_acks.py, notice tickets); a task that completed still never
    lacks its result."""
    counted(f"worker SIGKILL x{FAULTS}, Redis broker, results on another server",
            other_redis, interop_log_dir, "prefork", 2, (("CC_TEST_VT", KILL_VT),),
            kill_and_restart, float(KILL_VT) + 40, same_redis=False)


def cut_all(sides: dict) -> None:
    for ctx in sides.values():
        cut_redis(ctx)


@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_redis_cut_counted(pool, concurrency, redis_same_server, interop_log_dir):
    tallies = counted(f"Redis connections cut x{FAULTS}", redis_same_server, interop_log_dir,
                      pool, concurrency, (("CC_TEST_VT", VT),), cut_all, float(VT) + 30)
    ours, celery = tallies["ccworker"], tallies["celery"]
    assert ours.total("extra_runs") == 0, "a task ran twice after a Redis cut"
    assert ours.total("extra_runs") <= celery.total("extra_runs")


def close_vhost_connections(vhost: str) -> None:
    ctl = os.environ.get("CC_RABBITMQCTL", "rabbitmqctl").split()
    subprocess.run([*ctl, "close_all_connections", "-p", vhost, "fault test"],
                   check=True, capture_output=True, timeout=60)


def resumes_after(runs: Runs, faults: list[float]) -> list[float]:
    """Per fault: from the first send after it to that task's start
    (infinite if it never started)."""
    runs.refresh()
    out = []
    for at in faults:
        after = sorted((d["sent_at"], d["started"]) for d in runs.done if d["sent_at"] >= at)
        out.append(after[0][1] - after[0][0] if after else float("inf"))
    return out


@pytest.mark.parametrize(("pool", "concurrency"), POOLS)
def test_amqp_close_counted(pool, concurrency, amqp_broker_url, interop_log_dir):
    url, shared = amqp_broker_url
    if shared:
        pytest.fail("the RabbitMQ scenario needs a vhost of its own (rabbitmqctl)")
    vhost = url.rsplit("/", 1)[-1]
    closes: list[float] = []

    def close(_: dict) -> None:
        closes.append(time.time())
        close_vhost_connections(vhost)

    def resumes(sides: dict, tallies: dict) -> None:
        for kind, ctx in sides.items():
            tallies[kind].resumes = resumes_after(ctx["runs"], closes)

    # Celery's threads pool stops consuming after a close (issue 19): its
    # tasks never finish, so the wait for them is short.
    tallies = counted(f"RabbitMQ connections closed x{FAULTS} (resume: first task sent "
                      "after a close -> its start)", harness.BrokerEnv("amqp", url),
                      interop_log_dir, pool, concurrency, (), close, 15, same_redis=False,
                      more=resumes)
    assert max(tallies["ccworker"].resumes) <= AMQP_RESUME_BOUND, tallies["ccworker"].resumes
