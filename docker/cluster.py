"""docker/compose.yaml without Docker: a mixed cluster as local processes.

Starts, on the example project (docker/example/proj) and a broker you
already run (Redis on 127.0.0.1:6379 by default):

* a ``celery worker`` (``celery-worker@<host>``),
* a ``ccworker`` (``ccworker@<host>``) with its metrics endpoint,
* Flower, on 127.0.0.1,

then sends tasks with a real Celery client (docker/example/producer.py) and
prints which worker ran them, until Ctrl-C, which stops everything (warm
shutdowns; processes that do not stop in time are killed).

    python docker/cluster.py                     # Redis on 127.0.0.1:6379/0
    python docker/cluster.py --broker amqp://guest:guest@127.0.0.1:5672//
    python docker/cluster.py --check             # a fixed scenario; exit 0 or 1

``--check`` waits until Flower lists both workers online, sends tasks until
both kinds have run some, checks through Flower's API that tasks succeeded
on each worker and that the ccworker's /metrics and /healthz agree, then
stops everything and exits 0 if all of it held and every process stopped
cleanly. Process logs go to ``--log-dir`` (a new temporary directory unless
given); their tails are printed when something fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
EXAMPLE = HERE / "example"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_BACKEND = "redis://127.0.0.1:6379/0"


class Failed(Exception):
    """The cluster did not come up, or a check of --check did not hold."""


class Proc:
    """One child process in its own session, its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            # Its own session: Ctrl-C in the terminal reaches this script
            # only, which then stops the children in order.
            self.popen = subprocess.Popen(argv, cwd=str(EXAMPLE), env=env,
                                          stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def terminate(self) -> None:
        """SIGTERM to the process only: a warm shutdown for both kinds of worker."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> Optional[int]:
        """Its exit code, or None after killing its whole group at ``timeout``."""
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        try:  # pool processes it left behind, and it if still there
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if code is None:
            self.popen.wait()
        return code


class Flower:
    """Flower's REST API (unauthenticated: it listens on loopback only)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=15) as response:
            return json.loads(response.read())

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthcheck", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def online(self) -> dict[str, bool]:
        """{nodename: online} as Flower's worker list shows it."""
        return self.get("/api/workers?status=true")

    def succeeded_by_worker(self) -> dict[str, int]:
        """How many SUCCESS tasks Flower has seen per worker."""
        counts: dict[str, int] = {}
        for info in self.get("/api/tasks?state=SUCCESS").values():
            worker = info.get("worker")
            if worker:
                counts[worker] = counts.get(worker, 0) + 1
        return counts


def wait_until(check: Callable[[], Any], what: str, timeout: float,
               procs: list[Proc]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if not proc.alive():
                raise Failed(f"{proc.name} exited with {proc.popen.returncode} "
                             f"while waiting for {what}")
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise Failed(f"timed out after {timeout:g}s waiting for {what}")


class Cluster:
    """The three processes, started and stopped together."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.host = socket.gethostname()
        self.celery_name = f"celery-worker@{self.host}"
        self.ccworker_name = f"ccworker@{self.host}"
        self.log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="ccworker-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, BROKER_URL=args.broker, RESULT_BACKEND=args.backend,
                        PYTHONPATH=os.pathsep.join(
                            [str(EXAMPLE), *filter(None, [os.environ.get("PYTHONPATH")])]),
                        PYTHONUNBUFFERED="1", FLOWER_UNAUTHENTICATED_API="true")
        self.procs: list[Proc] = []
        self.flower = Flower(args.flower_port)
        self.metrics_url = f"http://127.0.0.1:{args.metrics_port}"

    def start(self) -> None:
        py, concurrency = sys.executable, str(self.args.concurrency)
        common = ["worker", "-l", "INFO", "-E", "-c", concurrency]
        commands = {
            "celery-worker": [py, "-m", "celery", "-A", "proj", *common, "-n", "celery-worker@%h"],
            "ccworker": [py, "-m", "celerycompat", "-A", "proj", *common, "-n", "ccworker@%h",
                         "--metrics-port", str(self.args.metrics_port)],
            "flower": [py, "-m", "celery", "-A", "proj", "flower", "--address=127.0.0.1",
                       f"--port={self.args.flower_port}"],
        }
        for name, argv in commands.items():
            proc = Proc(name, argv, self.env, self.log_dir)
            self.procs.append(proc)
            print(f"started {proc.name} (pid {proc.pid}), log: {proc.log_path}", flush=True)
        timeout = self.args.timeout
        for proc, name in zip(self.procs[:2], (self.celery_name, self.ccworker_name)):
            wait_until(lambda p=proc, n=name: f"{n} ready." in p.log(), f"{name} to be ready",
                       timeout, self.procs)
        wait_until(self.flower.up, "Flower to answer", timeout, self.procs)

    def stop(self) -> bool:
        """Workers first (warm shutdown, in parallel), then Flower; True if all exited 0."""
        workers, others = self.procs[:2], self.procs[2:]
        clean = True
        for group in (workers, others):
            for proc in group:
                proc.terminate()
            for proc in group:
                code = proc.wait(self.args.stop_timeout)
                if code != 0:
                    clean = False
                    print(f"{proc.name} stopped with {code if code is not None else 'SIGKILL'}"
                          f"\n--- {proc.log_path} (tail) ---\n{proc.tail()}", flush=True)
        return clean

    def tails(self) -> str:
        return "\n".join(f"--- {p.log_path} (tail) ---\n{p.tail()}" for p in self.procs)


def make_producer(batch: int, work: float) -> Any:
    """The example's producer, on this cluster's broker (the app reads the environment)."""
    from producer import Producer

    return Producer(batch=batch, work=work)


def check(cluster: Cluster) -> None:
    """The fixed scenario of --check; raises Failed at the first thing that does not hold."""
    names = (cluster.celery_name, cluster.ccworker_name)
    timeout = cluster.args.timeout
    wait_until(lambda: all(cluster.flower.online().get(n) for n in names),
               f"Flower to list {' and '.join(names)} online", timeout, cluster.procs)
    print("Flower lists both workers online", flush=True)
    send = make_producer(batch=10, work=0.05)
    deadline = time.monotonic() + timeout
    while not all(send.tally[n] >= 3 for n in names):
        if time.monotonic() > deadline:
            raise Failed(f"not both workers ran tasks: {send.summary()}")
        send.round()
    print(send.summary(), flush=True)
    ran = wait_until(
        lambda: (lambda c: c if all(c.get(n, 0) >= 3 for n in names) else None)(
            cluster.flower.succeeded_by_worker()),
        "Flower to show tasks succeeded on both workers", timeout, cluster.procs)
    print(f"Flower: succeeded tasks by worker: {ran}", flush=True)
    # A count follows the result a client sees by a moment (the result is
    # stored first), so it is waited for too.
    expected = send.tally[cluster.ccworker_name]
    counted = wait_until(lambda: (lambda n: n if n >= expected else None)(
        ccworker_succeeded(cluster.metrics_url, "proj.tasks.whoami")),
        f"ccworker's /metrics to count its {expected} whoami tasks", timeout, cluster.procs)
    with urllib.request.urlopen(cluster.metrics_url + "/healthz", timeout=10) as response:
        if response.status != 200:
            raise Failed(f"ccworker's /healthz says {response.status}")
    print(f"ccworker /metrics: {int(counted)} whoami tasks succeeded; /healthz ok", flush=True)


def ccworker_succeeded(metrics_url: str, task: str) -> float:
    """``ccworker_tasks_succeeded_total`` of ``task`` in the ccworker's /metrics."""
    with urllib.request.urlopen(metrics_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    prefix = f'ccworker_tasks_succeeded_total{{task="{task}"}} '
    return sum(float(line[len(prefix):]) for line in text.splitlines()
               if line.startswith(prefix))


def serve(cluster: Cluster, stop: Callable[[], bool]) -> None:
    """Interactive mode: URLs, then rounds of tasks until Ctrl-C."""
    from producer import run

    print(f"\nFlower:            {cluster.flower.url}\n"
          f"ccworker metrics:  {cluster.metrics_url}/metrics  (and /healthz, /readyz)\n"
          f"workers:           {cluster.celery_name}, {cluster.ccworker_name}\n"
          f"Sending tasks; Ctrl-C stops everything.\n", flush=True)
    run(make_producer(cluster.args.batch, cluster.args.work), cluster.args.interval,
        should_stop=stop)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="A celery worker, a ccworker and Flower as local processes "
                    "(docker/compose.yaml without Docker).")
    parser.add_argument("--broker", default=DEFAULT_BROKER,
                        help=f"broker URL (default {DEFAULT_BROKER})")
    parser.add_argument("--backend", default=None,
                        help="result backend URL (default: the broker URL for Redis, "
                             f"else {DEFAULT_BACKEND})")
    parser.add_argument("--flower-port", type=int, default=5555)
    parser.add_argument("--metrics-port", type=int, default=9808,
                        help="the ccworker's /metrics, /healthz, /readyz port")
    parser.add_argument("--concurrency", type=int, default=2, help="pool slots per worker")
    parser.add_argument("--batch", type=int, default=10, help="tasks per round")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between rounds")
    parser.add_argument("--work", type=float, default=0.05, help="seconds each task sleeps")
    parser.add_argument("--timeout", type=float, default=90.0,
                        help="seconds to wait for each step of start-up and of --check")
    parser.add_argument("--stop-timeout", type=float, default=30.0,
                        help="seconds a process may take to stop before it is killed")
    parser.add_argument("--log-dir", default=None, help="where process logs go")
    parser.add_argument("--check", action="store_true",
                        help="run the fixed scenario, stop, exit 0 if it held")
    args = parser.parse_args(argv)
    if args.backend is None:
        args.backend = args.broker if args.broker.startswith(("redis://", "rediss://")) \
            else DEFAULT_BACKEND
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    # The client side: the example project and its producer, on this broker.
    os.environ.update(BROKER_URL=args.broker, RESULT_BACKEND=args.backend)
    sys.path.insert(0, str(EXAMPLE))
    stopping: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        first = not stopping
        stopping.append(signum)
        if first:
            print("\nstopping the cluster...", flush=True)
        if args.check or not first:  # otherwise the current round finishes first
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster = Cluster(args)
    ok = True
    try:
        cluster.start()
        if args.check:
            check(cluster)
        else:
            serve(cluster, stop=lambda: bool(stopping))
    except Failed as exc:
        ok = False
        print(f"FAILED: {exc}\n{cluster.tails()}", flush=True)
    except KeyboardInterrupt:
        ok = not args.check  # an interrupted check did not pass
    finally:
        # Stopping has its own time limits (then SIGKILL): not interruptible.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        clean = cluster.stop()
    if args.check:
        print("check passed" if ok and clean else "check FAILED", flush=True)
    else:
        print("cluster stopped" if clean else "cluster stopped, not cleanly", flush=True)
    return 0 if ok and clean else 1


if __name__ == "__main__":
    sys.exit(main())
