"""Which Redis server and databases a pytest process of the run uses.

Every process gets three databases (broker, results, scratch: see
``harness``), so a FLUSHDB, a key count or a broadcast stays inside it. One
Redis server has 16 databases, which gives five isolated processes; the
run's processes past the fifth get a ``redis-server`` of their own (a free
port, nothing on disk, gone with the process), so ``-n`` is no longer
bounded by the shared server. The first five keep ``CC_REDIS_URL`` (the
machine's Redis by default), which is what a developer's single-process run
and the serial fault tests use.

Why: the interop scenarios mostly wait (time limits, visibility timeouts,
windows in which something must not happen), so on two cores more processes
side by side finish the run sooner; five left the cores about a third idle.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time

#: (broker, results, scratch) per process on the shared server; a run
#: without xdist keeps 10, 11 and 12, the defaults the test projects fall
#: back to.
DB_SLOTS = ((1, 2, 3), (4, 5, 6), (7, 8, 9), (10, 11, 12), (13, 14, 15))
SINGLE_PROCESS_SLOT = DB_SLOTS[3]

#: linux/prctl.h: the signal a child gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def xdist_index() -> int | None:
    """This process's number in a pytest-xdist run (``gw3`` -> 3), else None."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return int(worker.lstrip("gw")) if worker else None


def databases() -> tuple[int, int, int]:
    """(broker, results, scratch) for this process; past the fifth process
    of a run, on a private server (`start_private_server`)."""
    index = xdist_index()
    if index is None:
        return SINGLE_PROCESS_SLOT
    return DB_SLOTS[index % len(DB_SLOTS)]


def needs_private_server() -> bool:
    """Past the fifth process of a run, or when ``CC_PRIVATE_REDIS`` asks
    (``make test`` runs the serial modules beside the version matrix, whose
    processes hold every database of the shared server)."""
    if os.environ.get("CC_PRIVATE_REDIS"):
        return True
    index = xdist_index()
    return index is not None and index >= len(DB_SLOTS)


def _die_with_parent() -> None:
    """In the forked ``redis-server`` before exec: SIGTERM when pytest dies,
    so a killed run leaves no server behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start_private_server() -> str:
    """Start this process's own ``redis-server``; return its base URL.

    Stopped at exit (and by the kernel if pytest dies first). Fails loudly
    when ``redis-server`` is not installed: the run asked for more processes
    than the shared server can isolate.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            f"pytest-xdist process gw{xdist_index()}: the shared Redis isolates "
            f"{len(DB_SLOTS)} processes and redis-server is not on PATH to start "
            f"another; run with -n {len(DB_SLOTS)} or fewer")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--logfile", ""],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    atexit.register(stop)
    deadline = time.monotonic() + 20
    while not _answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop()
            raise RuntimeError(f"a private redis-server on port {port} did not start")
        time.sleep(0.05)
    return f"redis://127.0.0.1:{port}"
