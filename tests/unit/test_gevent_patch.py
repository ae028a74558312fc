"""``-P gevent`` detection and monkey patching before anything is imported.

The argv rules are pure and tested directly. Whether patching really
happens before the CLI (and kombu, redis, sockets) is imported is tested in
a subprocess that runs the real entry point, since patching cannot be
undone in this process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from celerycompat.concurrency_patch import (
    gevent_patched,
    maybe_patch_concurrency,
    pool_from_argv,
    requested_pool,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, pool", [
    (["-A", "proj", "-P", "gevent"], "gevent"),
    (["-A", "proj", "-Pgevent"], "gevent"),
    (["-A", "proj", "--pool", "gevent"], "gevent"),
    (["-A", "proj", "--pool=gevent"], "gevent"),
    (["-A", "proj", "worker", "-l", "INFO", "-P", "gevent", "-c", "1000"], "gevent"),
    (["-P", "eventlet"], "eventlet"),
    (["-P", "threads"], "threads"),
    (["-A", "proj"], None),
    ([], None),
    # The last one wins, as it does for click (the pool that will run).
    (["-P", "gevent", "-P", "solo"], "solo"),
    (["--pool=solo", "--pool", "gevent"], "gevent"),
    # A dangling -P is click's usage error, not a pool.
    (["-A", "proj", "-P"], None),
    # After "--" come key=value settings, never flags.
    (["-A", "proj", "--", "-P", "gevent"], None),
    # Other options that merely start alike are not the pool flag.
    (["--pool-start-method", "spawn"], None),
    (["--poolx=gevent"], None),
])
def test_pool_from_argv(argv, pool) -> None:
    assert pool_from_argv(argv) == pool


def test_environment_variable_counts_without_a_flag() -> None:
    env = {"CELERY_WORKER_POOL": "gevent"}
    assert requested_pool(["-A", "proj"], env) == "gevent"
    assert requested_pool(["-A", "proj", "-P", "solo"], env) == "solo"
    assert requested_pool(["-A", "proj"], {"CELERY_WORKER_POOL": ""}) is None
    assert requested_pool(["-A", "proj"], {}) is None


def test_other_pools_are_not_patched() -> None:
    assert maybe_patch_concurrency(["-P", "threads"], {}) is None
    assert maybe_patch_concurrency([], {}) is None
    assert not gevent_patched()  # this test process stays unpatched


def _run(code: str, *args: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_")}
    environ.update(env or {})
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                          cwd=str(REPO), env=environ, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


#: Runs the real entry point with the given argv, recording, at the moment
#: each watched module is first imported, whether the socket module was
#: already gevent's.
ENTRY_POINT_PROBE = """
    import json, sys
    seen = {}
    WATCHED = ("celerycompat.cli", "kombu", "redis", "celery")

    class Probe:
        def find_spec(self, name, path=None, target=None):
            if name in WATCHED and name not in seen:
                monkey = sys.modules.get("gevent.monkey")
                seen[name] = bool(monkey and monkey.is_module_patched("socket"))
            return None

    sys.meta_path.insert(0, Probe())
    sys.argv = ["ccworker", *sys.argv[1:]]
    from celerycompat.__main__ import main
    try:
        main()
    except SystemExit:
        pass
    from celerycompat.concurrency_patch import gevent_patched
    print(json.dumps({"seen": seen, "patched": gevent_patched()}))
"""


@pytest.mark.parametrize("argv, env", [
    (["-P", "gevent", "--help"], {}),
    (["-Pgevent", "--help"], {}),
    (["--pool=gevent", "--help"], {}),
    (["--help"], {"CELERY_WORKER_POOL": "gevent"}),
])
def test_entry_point_patches_before_imports(argv, env) -> None:
    """``ccworker``/``python -m celerycompat`` patch before the CLI, Celery,
    kombu or redis are imported (``--help`` stops right after parsing)."""
    result = _run(ENTRY_POINT_PROBE, *argv, env=env)
    assert result["patched"] is True
    assert result["seen"]["celerycompat.cli"] is True
    assert all(result["seen"].values()), result["seen"]


def test_entry_point_leaves_other_pools_alone() -> None:
    result = _run(ENTRY_POINT_PROBE, "-P", "threads", "--help")
    assert result["patched"] is False
    assert result["seen"]["celerycompat.cli"] is False


@pytest.mark.parametrize("library", ["gevent", "eventlet"])
def test_missing_green_library_is_one_line_saying_what_to_install(library) -> None:
    """gevent and eventlet are extras: ``-P <library>`` without it exits 1
    with one line."""
    code = f"""
        import sys
        sys.modules["{library}"] = None  # as if not installed: its import fails
        sys.argv = ["ccworker", "-A", "proj", "-P", "{library}"]
        from celerycompat.__main__ import main
        main()
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"ccworker: -P {library} needs the {library} package, which is not installed: "
        f"pip install 'celerycompat[{library}]'"]


def test_patched_process_gets_gevent_queue_and_socket() -> None:
    """What the consumer relies on: its ``_done`` queue and the broker socket
    become gevent's, so waiting on them lets task greenlets run."""
    result = _run("""
        import json
        from celerycompat.concurrency_patch import maybe_patch_concurrency
        maybe_patch_concurrency(["-P", "gevent"], {})
        import queue, select, socket
        import gevent.queue, gevent.socket
        print(json.dumps({
            "queue": queue.SimpleQueue is gevent.queue.SimpleQueue,
            "socket": socket.socket is gevent.socket.socket,
            "epoll_removed": not hasattr(select, "epoll"),
        }))
    """)
    assert result == {"queue": True, "socket": True, "epoll_removed": True}


# --------------------------------------------------------------------------
# The hub watchdog's bookkeeping (pure once given the clock readings)
# --------------------------------------------------------------------------


def test_watchdog_threshold_from_env() -> None:
    from celerycompat.pools.hub_watchdog import DEFAULT_THRESHOLD, threshold_from_env

    assert threshold_from_env({}) == DEFAULT_THRESHOLD
    assert threshold_from_env({"GEVENT_MAX_BLOCKING_TIME": "0.25"}) == 0.25
    assert threshold_from_env({"GEVENT_MAX_BLOCKING_TIME": "nonsense"}) == DEFAULT_THRESHOLD
    assert threshold_from_env({"GEVENT_MAX_BLOCKING_TIME": "0"}) == DEFAULT_THRESHOLD


def watchdog(describe, threshold):
    """gevent's hub watchdog, not started (the tests call it by hand)."""
    from celerycompat.pools.gevent_pool import GeventRuntime

    return GeventRuntime().watchdog(describe, threshold)


def test_watchdog_reports_each_block_once_with_culprit_and_duration(caplog) -> None:
    """A block is reported once when noticed (naming the task whose frame the
    main thread runs) and once when it ends (with how long it lasted)."""
    marker = sys._getframe()  # this test stands for the task greenlet

    def describe(frame):
        return "Task proj.spin[abc]" if frame is marker else None

    # Constructed in this thread, so "the main thread" is this one.
    dog = watchdog(describe, threshold=1.0)
    caplog.set_level(logging.WARNING, logger="celery.concurrency.gevent")
    dog._beat = 100.0
    dog.check(now=100.5)  # within the threshold: nothing
    assert caplog.messages == []
    dog.check(now=101.2)
    dog.check(now=102.0)  # the same block: not reported again
    assert len(caplog.messages) == 1
    assert caplog.messages[0].startswith("Task proj.spin[abc] (at ")
    assert "has blocked the gevent event loop for 1.20s" in caplog.messages[0]
    # The hub turns again; its timer measured the stall.
    dog.on_tick(now=102.5)
    dog.check(now=102.6)
    assert caplog.messages[1].startswith("Task proj.spin[abc] (at ")
    assert caplog.messages[1].endswith("blocked the gevent event loop for 2.50s")
    dog.check(now=102.7)
    assert len(caplog.messages) == 2


def test_watchdog_names_code_outside_tasks(caplog) -> None:
    dog = watchdog(lambda frame: None, threshold=0.5)
    caplog.set_level(logging.WARNING, logger="celery.concurrency.gevent")
    dog._beat = 10.0
    dog.check(now=11.0)
    assert caplog.messages[0].startswith("Code outside any task (at ")


# --------------------------------------------------------------------------
# A gevent pool asked for where the process is not patched
# --------------------------------------------------------------------------


@pytest.mark.parametrize("green", ["gevent", "eventlet"])
def test_unpatched_green_pool_runs_threads_with_a_warning(green) -> None:
    """``worker_pool = "gevent"`` (or ``-P gevent`` reaching a process that
    was not started through the entry point) is seen after the app was
    imported, too late to patch: threads, and a line saying what to do.
    The same for eventlet."""
    from celery import Celery

    from celerycompat.options import resolve_worker_options

    app = Celery("unpatched", set_as_current=False)
    options = resolve_worker_options(app, {"hostname": "w@h", "pool": green})
    assert (options.requested_pool, options.pool) == (green, "threads")
    assert [line for line in options.unsupported if green in line] == [
        f"ccworker: the {green} pool needs -P {green} on the command line "
        f"(or CELERY_WORKER_POOL={green}), so the process is monkey-patched before the "
        "app is imported; using 'threads' instead"]


def test_patched_process_runs_the_eventlet_pool() -> None:
    """``-P eventlet`` patches with eventlet (as Celery's ``_patch_eventlet``)."""
    result = _run("""
        import json
        from celerycompat.concurrency_patch import eventlet_patched, maybe_patch_concurrency
        assert maybe_patch_concurrency(["-P", "eventlet"], {}) == "eventlet"
        from celery import Celery
        from celerycompat.options import resolve_worker_options
        app = Celery("patched", set_as_current=False)
        options = resolve_worker_options(app, {"hostname": "w@h", "pool": "eventlet"})
        print(json.dumps({"patched": eventlet_patched(), "pool": options.pool,
                          "warnings": options.unsupported}))
    """)
    assert result == {"patched": True, "pool": "eventlet", "warnings": []}


def test_patched_process_runs_the_gevent_pool() -> None:
    result = _run("""
        import json
        from celerycompat.concurrency_patch import maybe_patch_concurrency
        maybe_patch_concurrency(["-P", "gevent"], {})
        from celery import Celery
        from celerycompat.options import resolve_worker_options
        app = Celery("patched", set_as_current=False)
        options = resolve_worker_options(app, {"hostname": "w@h", "pool": "gevent"})
        print(json.dumps({"pool": options.pool, "warnings": options.unsupported}))
    """)
    assert result == {"pool": "gevent", "warnings": []}
