"""The README's first command: a ccworker on an embedded broker, a real Celery client.

Starts ``ccworker -A proj`` as a subprocess on kombu's ``filesystem://``
broker (no server needed), sends it tasks with the project's own Celery app
(``.delay``, ``apply_async``, a chain), prints what comes back, and stops the
worker with SIGTERM (a warm shutdown), exiting non-zero if anything failed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    data = tempfile.mkdtemp(prefix="ccworker-demo-")
    env = dict(os.environ, DEMO_DATA_DIR=data, PYTHONPATH=HERE)
    os.environ.update(DEMO_DATA_DIR=data)
    sys.path.insert(0, HERE)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celerycompat", "-A", "proj", "-P", "threads", "-c", "2",
         "-l", "INFO", "-n", "demo@%h"],
        cwd=HERE, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        _wait_ready(worker)
        # Keep reading the worker's output: a pipe nobody reads fills (64 KiB),
        # and the worker then blocks on its next log line, tasks and all.
        threading.Thread(target=_drain, args=(worker,), daemon=True).start()
        from celery import chain
        from proj.celery import app  # the project's app: shared_task binds to it
        from proj.tasks import add, divide, whoami

        app.set_current()

        print(f"add(2, 3)           -> {add.delay(2, 3).get(timeout=10)}")
        print(f"whoami()            -> {whoami.delay().get(timeout=10)}")
        print(f"chain add 1+2, +10  -> {chain(add.s(1, 2), add.s(10)).delay().get(timeout=10)}")
        outcome = divide.apply_async((1, 0))
        try:
            outcome.get(timeout=10)
        except ZeroDivisionError as exc:
            print(f"divide(1, 0)        -> raised {exc!r} (state {outcome.state})")
        results = [add.delay(i, i) for i in range(100)]
        total = sum(r.get(timeout=30) for r in results)
        print(f"100 x add(i, i)     -> sum {total}")
        return 0
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        time.sleep(0.2)  # the reader takes the last lines
        print("--- worker log (tail) ---")
        print("".join(_LOG[-8:]).rstrip())
        shutil.rmtree(data, ignore_errors=True)


#: Every line the worker wrote after it was ready (read by `_drain`).
_LOG: list[str] = []


def _drain(worker: subprocess.Popen) -> None:
    assert worker.stdout is not None
    for line in worker.stdout:
        _LOG.append(line)


def _wait_ready(worker: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    seen = []
    assert worker.stdout is not None
    while time.monotonic() < deadline:
        line = worker.stdout.readline()
        if not line:
            raise SystemExit("ccworker exited before it was ready:\n" + "".join(seen))
        seen.append(line)
        if " ready." in line:
            print(line.rstrip())
            return
    raise SystemExit("ccworker was not ready in time:\n" + "".join(seen))


if __name__ == "__main__":
    sys.exit(main())
