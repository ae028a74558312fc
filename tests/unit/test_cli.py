"""``ccworker`` command-line parsing and option resolution.

Two kinds of tests: direct ones on :func:`parse_worker_options` (every flag,
short and long, in any position), and differential ones that feed the same
command line to real ``celery worker`` (with its ``Worker`` replaced by a
recorder, see ``projects/_oracle.py``) and compare what both would run with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from celerycompat.cli import parse_worker_options
from celerycompat.nodenames import local_hostname

PROJECTS = Path(__file__).parent / "projects"
PYTHON = sys.executable
HOST = local_hostname()

#: Environment variables the CLI reads or writes; cleared around every test.
_ENV_PREFIXES = ("CELERY_", "DJANGO_SETTINGS_MODULE", "APP", "BROKER_URL", "RESULT_BACKEND",
                 "LOADER", "CONFIG_MODULE", "NO_COLOR", "SKIP_CHECKS")


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}


@pytest.fixture
def projects(monkeypatch: pytest.MonkeyPatch):
    """Run inside ``projects/`` and forget every module and variable after."""
    monkeypatch.chdir(PROJECTS)
    modules, path, environ = set(sys.modules), list(sys.path), dict(os.environ)
    os.environ.clear()
    os.environ.update(_clean_env())
    yield PROJECTS
    for name in set(sys.modules) - modules:
        del sys.modules[name]
    sys.path[:] = path
    os.environ.clear()
    os.environ.update(environ)


def parse(*argv: str):
    return parse_worker_options(list(argv))


# --------------------------------------------------------------------------
# Every flag, short and long


@pytest.mark.parametrize("argv", [
    ["-A", "plainmod"], ["--app", "plainmod"], ["--app=plainmod"],
    ["-Aplainmod"], ["worker", "-A", "plainmod"], ["-l", "info", "-A", "plainmod", "worker"],
])
def test_app_option_anywhere(projects, argv) -> None:
    assert parse(*argv).app.main == "plainmod"


def test_defaults(projects) -> None:
    o = parse("-A", "plainmod")
    assert o.nodename == f"celery@{HOST}"
    assert (o.pool, o.requested_pool) == ("prefork", "prefork")
    assert o.loglevel == 30 and o.logfile is None
    assert o.concurrency == (os.cpu_count() or 2)
    assert o.prefetch_multiplier == 4 and o.disable_prefetch is False
    assert o.queues == [] and o.exclude_queues == [] and o.include == []
    assert o.task_events is False and o.time_limit is None and o.soft_time_limit is None
    assert o.optimization == "default" and o.purge is False
    assert o.heartbeat_interval == 2.0 and o.autoscale is None
    assert o.schedule_filename == "celerybeat-schedule"
    assert o.scheduler == "celery.beat:PersistentScheduler"
    assert o.pool_start_method == "fork" and o.statedb is None and o.pidfile is None
    assert o.unsupported == []


@pytest.mark.parametrize(("argv", "field", "expected"), [
    (["-n", "w1@%h"], "nodename", f"w1@{HOST}"),
    (["--hostname=w2"], "nodename", "celery@w2"),
    (["-D"], "detach", True), (["--detach"], "detach", True),
    (["-S", "/tmp/%n.db"], "statedb", "/tmp/celery.db"),
    (["--statedb", "/tmp/x"], "statedb", "/tmp/x"),
    (["-l", "debug"], "loglevel", 10), (["--loglevel", "Error"], "loglevel", 40),
    (["-l", "FATAL"], "loglevel", 50), (["-l", "critical"], "loglevel", 50),
    (["-O", "fair"], "optimization", "fair"), (["--optimization", "default"], "optimization",
                                               "default"),
    (["--prefetch-multiplier", "1"], "prefetch_multiplier", 1),
    (["--prefetch-multiplier", "0"], "prefetch_multiplier", 4),
    (["--disable-prefetch"], "disable_prefetch", True),
    (["-c", "3"], "concurrency", 3), (["--concurrency=5"], "concurrency", 5),
    (["-c", "0"], "concurrency", os.cpu_count()),
    (["-c", "AUTO"], "concurrency", os.cpu_count()),
    (["-P", "solo"], "pool", "solo"), (["--pool", "threads"], "pool", "threads"),
    (["-P", "gevent"], "pool", "threads"), (["-P", "eventlet"], "requested_pool", "eventlet"),
    (["-P", "processes"], "pool", "prefork"),
    (["-E"], "task_events", True), (["--task-events"], "task_events", True),
    (["--events"], "task_events", True),
    (["--time-limit", "2.5"], "time_limit", 2.5),
    (["--soft-time-limit", "1"], "soft_time_limit", 1.0),
    (["--max-tasks-per-child", "10"], "max_tasks_per_child", 10),
    (["--max-memory-per-child", "1000"], "max_memory_per_child", 1000),
    (["--pool-start-method", "spawn"], "pool_start_method", "spawn"),
    (["--purge"], "purge", True), (["--discard"], "purge", True),
    (["-Q", "a,b"], "queues", ["a", "b"]), (["--queues", "c"], "queues", ["c"]),
    (["-X", "a"], "exclude_queues", ["a"]), (["--exclude-queues", "a,b"], "exclude_queues",
                                             ["a", "b"]),
    (["-I", "m1,m2"], "include", ["m1", "m2"]), (["--include", "m"], "include", ["m"]),
    (["--without-gossip"], "without_gossip", True),
    (["--without-mingle"], "without_mingle", True),
    (["--without-heartbeat"], "without_heartbeat", True),
    (["--heartbeat-interval", "5"], "heartbeat_interval", 5.0),
    (["--autoscale", "3,10"], "autoscale", (10, 3)),
    (["--autoscale", "10,3"], "autoscale", (10, 3)),
    (["--autoscale", "4"], "autoscale", (4, 0)),
    (["-B"], "beat", True), (["--beat"], "beat", True),
    (["-s", "/tmp/s"], "schedule_filename", "/tmp/s"),
    (["--schedule-filename", "/tmp/s"], "schedule_filename", "/tmp/s"),
    (["--schedule", "/tmp/s"], "schedule_filename", "/tmp/s"),
    (["--scheduler", "x:Y"], "scheduler", "x:Y"),
    (["-f", "/tmp/%n.log"], "logfile", "/tmp/%n.log"),
    (["--logfile", "/tmp/l"], "logfile", "/tmp/l"),
    (["--pidfile", "/tmp/%n-%p.pid"], "pidfile", f"/tmp/w9-w9@{HOST}.pid"),
    (["--uid", "1000"], "uid", "1000"), (["--gid", "1000"], "gid", "1000"),
    (["--umask", "022"], "umask", "022"), (["--executable", "/bin/py"], "executable",
                                          "/bin/py"),
    (["-C"], "no_color", True), (["--no-color"], "no_color", True),
    (["-q"], "quiet", True), (["--quiet"], "quiet", True),
])
def test_each_flag(projects, argv, field, expected) -> None:
    extra = ["-n", "w9@%h"] if field == "pidfile" else []
    assert getattr(parse("-A", "plainmod", *extra, *argv), field) == expected


def test_logfile_path_is_node_formatted(projects) -> None:
    o = parse("-A", "plainmod", "-n", "w3@%h", "-f", "/tmp/%n%I.log")
    assert o.logfile == "/tmp/%n%I.log"
    assert o.logfile_path == "/tmp/w3.log"


def test_global_options_after_worker_options(projects) -> None:
    o = parse("-l", "INFO", "-b", "redis://h:1/0", "--result-backend", "redis://h:1/1",
              "-A", "plainmod", "worker")
    assert o.app.conf.broker_url == "redis://h:1/0"
    assert o.app.conf.result_backend == "redis://h:1/1"


def test_skip_checks_exports_variable(projects) -> None:
    parse("-A", "plainmod", "--skip-checks")
    assert os.environ["CELERY_SKIP_CHECKS"] == "true"


def test_workdir_chdirs_before_loading(projects, tmp_path) -> None:
    (tmp_path / "wdproj.py").write_text(
        "from celery import Celery\napp = Celery('wdproj', set_as_current=False)\n")
    o = parse("--workdir", str(tmp_path), "-A", "wdproj")
    assert o.app.main == "wdproj"
    assert os.getcwd() == str(tmp_path)


def test_config_option(projects) -> None:
    o = parse("-A", "bareapp", "--config", "altconfig")
    assert o.prefetch_multiplier == 9
    assert o.app.conf.task_default_queue == "from-altconfig"


def test_environment_variables(projects, monkeypatch) -> None:
    monkeypatch.setenv("CELERY_APP", "plainmod")
    monkeypatch.setenv("CELERY_WORKER_LOGLEVEL", "info")
    monkeypatch.setenv("CELERY_WORKER_CONCURRENCY", "7")
    monkeypatch.setenv("CELERY_WORKER_QUEUES", "q1,q2")
    monkeypatch.setenv("BROKER_URL", "redis://env:1/0")
    o = parse()
    assert (o.app.main, o.loglevel, o.concurrency) == ("plainmod", 20, 7)
    assert o.queues == ["q1", "q2"]
    assert o.app.conf.broker_url == "redis://env:1/0"


def test_flags_beat_settings(projects) -> None:
    o = parse("-A", "confproj", "-c", "2", "--prefetch-multiplier", "1", "--time-limit", "5",
              "-P", "threads", "-S", "/tmp/other")
    assert (o.concurrency, o.prefetch_multiplier, o.time_limit) == (2, 1, 5.0)
    assert o.pool == "threads" and o.statedb == "/tmp/other"


def test_settings_fill_in(projects) -> None:
    o = parse("-A", "confproj", "-n", "w5@h")
    assert (o.concurrency, o.prefetch_multiplier, o.task_events) == (3, 7, True)
    assert (o.time_limit, o.soft_time_limit) == (30.0, 20.0)
    assert (o.max_tasks_per_child, o.max_memory_per_child) == (11, 12000)
    assert o.statedb == "/tmp/state-w5.db"
    assert (o.pool, o.requested_pool) == ("solo", "solo")
    assert o.unsupported == []  # worker_state_db is honoured (consumer/statedb.py)


def test_one_warning_per_unsupported_flag(projects) -> None:
    o = parse("-A", "plainmod", "-P", "solo", "-B", "-s", "x", "--scheduler", "y",
              "--autoscale", "2", "--pool-start-method", "spawn", "--umask", "022",
              "--executable", "/bin/x", "--without-gossip", "--without-mingle",
              "--without-heartbeat", "--heartbeat-interval", "3", "-O", "fair")
    # --autoscale on solo (-B, -s and --scheduler are honoured:
    # celerycompat/beat.py; --umask and --executable only act with -D, as in
    # Celery, which ignores them silently otherwise: celerycompat/daemon.py;
    # --pool-start-method is the prefork pool's: pools/spawned.py).
    assert len(o.unsupported) == 1
    assert not any("umask" in line or "executable" in line for line in o.unsupported)
    assert all(line.startswith("ccworker: ") and "\n" not in line for line in o.unsupported)
    assert not any("gossip" in line or "fair" in line for line in o.unsupported)


# --------------------------------------------------------------------------
# Trailing key=value settings


def test_config_arguments(projects) -> None:
    o = parse("-A", "plainmod", "worker", "-l", "info", "--",
              "worker.prefetch_multiplier=1", "_disable_rate_limits=(json)true",
              "task_default_queue=hipri", "result_expires=(int)60")
    conf = o.app.conf
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_disable_rate_limits is True
    assert conf.task_default_queue == "hipri"
    assert conf.result_expires == 60
    # As in Celery 5.7: the flag's fallback was read before these settings.
    assert o.prefetch_multiplier == 4


def test_config_arguments_without_separator(projects) -> None:
    o = parse("-A", "plainmod", "worker", "task_default_queue=q")
    assert o.app.conf.task_default_queue == "q"


def test_bad_config_argument_is_usage_error(projects) -> None:
    with pytest.raises(click.UsageError, match="Unable to parse extra configuration"):
        parse("-A", "plainmod", "worker", "bogus")


# --------------------------------------------------------------------------
# Errors, version, help


@pytest.mark.parametrize("argv", [
    ["-A", "plainmod", "--no-such-flag"],
    ["-A", "plainmod", "-l", "verbose"],
    ["-A", "plainmod", "-P", "nonsense"],
    ["-A", "plainmod", "-c", "-1"],
    ["-A", "plainmod", "-c", "many"],
    ["-A", "plainmod", "-O", "FAIR"],
    ["-A", "plainmod", "--autoscale", "1,2,3"],
    ["-A", "plainmod", "--autoscale", "a,b"],
    ["-A", "plainmod", "-n", "w1@%x"],
    ["-A", "plainmod", "--time-limit", "soon"],
])
def test_usage_errors(projects, argv) -> None:
    with pytest.raises(click.UsageError):
        parse(*argv)


@pytest.mark.parametrize(("spec", "message"), [
    ("does_not_exist", "The module does_not_exist was not found."),
    ("importerror", "following error occurred"),
    ("noapp", "Module 'noapp' has no attribute 'celery'"),
])
def test_app_errors_are_usage_errors(projects, spec, message) -> None:
    with pytest.raises(click.UsageError, match=message):
        parse("-A", spec)


def run_ccworker(*argv: str, env: dict[str, str] | None = None,
                 cwd: Path = PROJECTS) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "celerycompat", *argv], cwd=cwd, text=True,
                          capture_output=True, env={**_clean_env(), **(env or {})},
                          timeout=60)


def test_version() -> None:
    import celery

    from celerycompat import __version__

    done = run_ccworker("--version", "-A", "module_that_is_not_loaded")
    assert done.returncode == 0
    assert done.stdout == f"celerycompat {__version__} (celery {celery.__version__})\n"


def test_help_lists_every_option_and_app_options() -> None:
    done = run_ccworker("-A", "preloadproj", "--help")
    assert done.returncode == 0
    for flag in ("--hostname", "--detach", "--statedb", "--loglevel", "--optimization",
                 "--prefetch-multiplier", "--disable-prefetch", "--concurrency", "--pool",
                 "--task-events", "--time-limit", "--soft-time-limit",
                 "--max-tasks-per-child", "--pool-start-method", "--max-memory-per-child",
                 "--purge", "--queues", "--exclude-queues", "--include", "--without-gossip",
                 "--without-mingle", "--without-heartbeat", "--heartbeat-interval",
                 "--autoscale", "--beat", "--schedule-filename", "--scheduler", "--logfile",
                 "--pidfile", "--uid", "--gid", "--umask", "--executable", "--app",
                 "--broker", "--result-backend", "--loader", "--config", "--workdir",
                 "--no-color", "--quiet", "--version", "--skip-checks", "--template",
                 "--monitoring"):
        assert flag in done.stdout, flag


def test_unknown_option_exits_2_like_celery() -> None:
    done = run_ccworker("-A", "plainmod", "--bogus")
    assert done.returncode == 2
    assert "No such option '--bogus'" in done.stderr


def test_missing_module_exits_2() -> None:
    done = run_ccworker("-A", "not_a_module_anywhere")
    assert done.returncode == 2
    assert "The module not_a_module_anywhere was not found." in done.stderr


# --------------------------------------------------------------------------
# Preload and worker options declared by the app


def test_preload_and_worker_user_options(projects) -> None:
    import importlib

    o = parse("-A", "preloadproj", "-Z", "mine", "--monitoring")
    module = importlib.import_module("preloadproj")
    assert o.user_options == {"template": "mine", "monitoring": True}
    assert module.received == [("user_preload_options", {"template": "mine"})]


def test_preload_defaults_are_sent(projects) -> None:
    import importlib

    parse("-A", "preloadproj")
    module = importlib.import_module("preloadproj")
    assert module.received == [("user_preload_options", {"template": "default-template"})]


def test_attached_preload_value_is_not_read_as_known_flags(projects) -> None:
    """``-Zlx`` is ``-Z lx`` for the app, not ``-l x`` (pass 1 must not fail)."""
    o = parse("-A", "preloadproj", "-Zlx", "-l", "info")
    assert o.user_options["template"] == "lx" and o.loglevel == 20


def test_preload_option_needs_the_app(projects) -> None:
    with pytest.raises(click.UsageError, match="No such option"):
        parse("-A", "plainmod", "-Z", "x")


# --------------------------------------------------------------------------
# Running: the whole startup in a fresh process


#: What ``celeryd_init`` receivers get as ``options`` (Celery's ``Worker``
#: keywords minus ``hostname``/``quiet``; Celery also adds ``pool_cls=None``).
#: What a real ``celery worker`` 5.7 passes as ``celeryd_init(options=...)``
#: (seen by tests/interop/test_foundation_differential.py::test_hook_and_signal_order):
#: ``pool`` *and* ``pool_cls``.
CELERYD_INIT_OPTIONS = [
    "pool_cls", "template", "monitoring", "loglevel", "logfile", "pidfile", "statedb", "no_color",
    "queues", "autoscale", "detach", "optimization", "prefetch_multiplier", "concurrency",
    "pool", "task_events", "time_limit", "soft_time_limit", "max_tasks_per_child",
    "pool_start_method", "max_memory_per_child", "purge", "exclude_queues", "include",
    "without_gossip", "without_mingle", "without_heartbeat", "heartbeat_interval", "beat",
    "schedule_filename", "scheduler", "umask", "executable",
]

RUN_SNIPPET = """
import json, logging, sys
from celerycompat import cli
seen = {}
def runner(options):
    import preloadproj
    seen["received"] = preloadproj.received
    seen["time_limit"] = options.time_limit
    seen["pidfile"] = options.pidfile
    seen["pid_in_file"] = open(options.pidfile).read().strip() if options.pidfile else None
    seen["root_level"] = logging.getLogger().level
    seen["finalized"] = options.app.finalized
    sys.__stdout__.write(json.dumps(seen) + "\\n")
    return 3
cli.main(sys.argv[1:], runner=runner)
"""


def test_run_boots_in_celery_order_and_exits_with_runner_code(tmp_path) -> None:
    pidfile = tmp_path / "%n.pid"
    done = subprocess.run(
        [PYTHON, "-c", RUN_SNIPPET, "-A", "preloadproj", "worker", "-n", "w7@%h", "-l", "info",
         "--pidfile", str(pidfile), "-P", "solo", "--pool-start-method", "spawn"],
        cwd=PROJECTS, text=True, capture_output=True, env=_clean_env(), timeout=60)
    assert done.returncode == 3, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    nodename = f"w7@{HOST}"
    assert seen["received"] == [
        ["user_preload_options", {"template": "default-template"}],
        ["import_modules"],
        ["celeryd_init", nodename, sorted(CELERYD_INIT_OPTIONS)],
        ["worker_init", nodename, "preloadproj"],
    ]
    assert seen["time_limit"] == 99.0  # set by a celeryd_init receiver
    assert seen["pidfile"] == str(tmp_path / "w7.pid")
    assert seen["pid_in_file"] is not None
    assert not (tmp_path / "w7.pid").exists()  # removed at exit
    assert seen["root_level"] == 20 and seen["finalized"] is True
    # --pool-start-method is the prefork pool's (solo ignores it, as Celery's).
    warnings = [line for line in done.stderr.splitlines() if "ccworker:" in line]
    assert warnings == []


def test_run_refuses_live_pidfile(tmp_path) -> None:
    pidfile = tmp_path / "w.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    done = subprocess.run(
        [PYTHON, "-c", RUN_SNIPPET, "-A", "preloadproj", "--pidfile", str(pidfile)],
        cwd=PROJECTS, text=True, capture_output=True, env=_clean_env(), timeout=60)
    assert done.returncode != 0 and done.returncode != 3
    assert "already exists" in done.stderr
    assert pidfile.read_text() == f"{os.getpid()}\n"


# --------------------------------------------------------------------------
# Differential: the same command lines through real ``celery worker``


ORACLE_CASES = [
    {"argv": ["-A", "plainmod", "worker"]},
    {"argv": ["-A", "plainmod", "worker", "-l", "info", "-c", "3", "-Q", "a,b", "-X", "c",
              "-n", "w1@%h", "--autoscale", "3,10", "-O", "fair", "--purge"]},
    {"argv": ["-A", "plainmod", "worker", "-c", "0", "--prefetch-multiplier", "0"]},
    {"argv": ["-A", "plainmod", "worker", "-P", "solo", "-E", "--time-limit", "3",
              "--soft-time-limit", "2", "--max-tasks-per-child", "5",
              "--max-memory-per-child", "100", "--pool-start-method", "spawn"]},
    {"argv": ["-A", "plainmod", "worker", "-S", "/tmp/%n-%h.db", "-n", "x@y.z",
              "--pidfile", "/run/%n.pid", "-f", "/log/%p.log", "-s", "/tmp/sched",
              "--scheduler", "a.b:C"]},
    {"argv": ["-A", "confproj", "worker"]},
    {"argv": ["-A", "confproj", "worker", "-P", "prefork"]},
    {"argv": ["-A", "confproj", "worker", "-P", "threads", "-c", "2", "--time-limit", "1"]},
    {"argv": ["-A", "plainmod", "worker", "--", "worker_prefetch_multiplier=1",
              "_disable_prefetch=(json)true", "task_default_queue=q9"]},
    {"argv": ["-A", "plainmod", "-b", "redis://b:1/0", "--result-backend", "redis://b:1/1",
              "worker", "--disable-prefetch"]},
    {"argv": ["-A", "bareapp", "--config", "altconfig", "worker"]},
    {"argv": ["-A", "plainmod", "worker"],
     "env": {"CELERY_WORKER_CONCURRENCY": "6", "CELERY_WORKER_LOGLEVEL": "error",
             "CELERY_WORKER_HOSTNAME": "envnode@%h"}},
    {"argv": ["-A", "plainmod", "worker", "-c", "auto"]},
    {"argv": ["-A", "pkgproj", "worker", "-I", "pkgproj.extra", "-P", "gevent"]},
]

#: Keywords that legitimately differ: Celery passes a pool *class* and a
#: ``pool_cls=None`` placeholder, and pops uid/gid/disable_prefetch.
_KWARGS_IGNORED = {"pool_cls", "uid", "gid", "disable_prefetch"}


@pytest.fixture(scope="module")
def oracle_results():
    done = subprocess.run([PYTHON, "_oracle.py"], input=json.dumps(ORACLE_CASES), cwd=PROJECTS,
                          text=True, capture_output=True, env=_clean_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("index", range(len(ORACLE_CASES)),
                         ids=[" ".join(c["argv"][2:]) or "plain" for c in ORACLE_CASES])
def test_same_as_celery_worker(oracle_results, index) -> None:
    result = oracle_results[index]
    theirs, ours = result["celery"], result["ours"]
    assert "error" not in theirs and "error" not in ours, result
    for key in set(theirs["kwargs"]) - _KWARGS_IGNORED:
        assert ours["kwargs"][key] == theirs["kwargs"][key], key
    resolved = dict(theirs["resolved"])
    if not resolved["concurrency"] or resolved["concurrency"] == "auto":
        resolved["concurrency"] = ours["resolved"]["concurrency"]  # CPU count, checked above
    assert ours["resolved"] == resolved
    assert ours["conf"] == theirs["conf"]


FAILING_RUN_SNIPPET = """
import sys
from celerycompat import cli
def runner(options):
    print("task output goes to the log")
    raise RuntimeError("the worker broke")
cli.main(sys.argv[1:], runner=runner)
"""


def test_an_error_escaping_the_worker_is_logged_once_and_exits_1() -> None:
    """Celery's ``Unrecoverable error: ...`` line with its traceback, once; not
    the traceback written fragment by fragment through the redirected stderr."""
    done = subprocess.run(
        [PYTHON, "-c", FAILING_RUN_SNIPPET, "-A", "preloadproj", "-l", "info", "-P", "solo"],
        cwd=PROJECTS, text=True, capture_output=True, env=_clean_env(), timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("Unrecoverable error: RuntimeError('the worker broke')") == 1
    assert done.stderr.count("Traceback (most recent call last)") == 1
    assert len([line for line in done.stderr.splitlines() if "WARNING/" in line]) <= 1
