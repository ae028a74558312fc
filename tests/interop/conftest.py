"""Fixtures for the differential interop tests: brokers, workers, comparison.

* ``broker`` is parametrized over ``redis`` and ``amqp``: every differential
  scenario runs on both. Reachability is checked once per session; an
  unreachable broker ends the session with a non-zero exit and a message
  saying how to start it. It never skips: a green run that compared nothing
  is worse than a red one.
* ``run_differential`` is ``harness.run_differential`` bound to this
  module's ``WorkerCache``, so workers are started once per module per
  (kind, broker, spec) and stopped at the end of the module, also when tests
  fail.
* Isolation: every worker gets its own task queue
  (``task_default_queue=ccit.<kind>.<token>``), record list and node name,
  so the two sides, parallel pytest sessions and the tests of a module never
  share a queue. Tests sharing a module's worker run one after the other on
  it; each starts with a sentinel round-trip (everything sent before is
  done) and only reads the ids it created. A per-*test* queue would need a
  worker per test (about 2 s per side and broker, times every scenario) or
  ``add_consumer`` remote control, which is not a foundation feature.
  Redis: broker in db 10, results and records in db 11. RabbitMQ: a vhost
  per session (see ``harness.RabbitVhost``).
* A failed comparison prints a unified diff of the normalised observations
  and the tails of the logs of the workers the test used.
* A failed test runs once more before it fails the session; reruns are
  listed at the end (``INTEROP_RERUNS`` below).
"""

from __future__ import annotations

import functools
import gc
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(HERE / "projects") not in sys.path:
    sys.path.insert(0, str(HERE / "projects"))

import harness  # noqa: E402


# Celery's Redis result consumer keys its subscriptions by task id, and an
# ``AsyncResult`` unsubscribes its id in ``__del__``. AsyncResults sit in
# reference cycles, so the cyclic garbage collector runs those ``__del__``
# whenever it likes: (a) inside another pubsub command of the consumer,
# nested, which deadlocks the test process for good (Celery <= 5.5 with
# redis-py 5; seen in the version matrix under 5.4.0); (b) while another
# AsyncResult of the same id waits in ``get()``, which unsubscribes it, so
# the SUCCESS publish is missed and ``get()`` times out with the result
# stored (a signature's ``freeze()`` leaves such a twin; seen under 5.6.3).
# Both are the client's defects, not the workers' under test. So automatic
# collection is off in the test process, and each test ends with a
# collection, when no pubsub command runs and nothing waits.
@pytest.fixture(autouse=True)
def _no_garbage_collection_during_a_test():
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


START_HINTS = {
    "redis": (
        "start one with `docker run -d -p 6379:6379 redis:7` or `redis-server --daemonize yes`,"
        " or point CC_REDIS_URL at one"
    ),
    "amqp": (
        "start one with `docker run -d -p 5672:5672 rabbitmq:3` or"
        " `rabbitmq-server -detached`, or point CC_AMQP_URL at one"
        " (and CC_RABBITMQCTL at its rabbitmqctl for per-session vhosts)"
    ),
}


def _broker_unreachable(name: str, url: str, why: str) -> None:
    """End the session, loudly: the interop suite needs real brokers."""
    where = "CI=true: the CI job must provide it. " if os.environ.get("CI") == "true" else ""
    pytest.exit(
        f"interop tests need {name} at {url}, which is unreachable ({why}). "
        f"{where}To run them locally, {START_HINTS[name]}. "
        f"To run only the other tests: pytest -m 'not interop'.",
        returncode=3,
    )


# An interop test that fails runs once more (pytest-rerunfailures); one
# that fails twice fails the run. These tests time real processes on a
# shared machine (two workers, two brokers, a client), and a single slow
# scheduling slice can decide one of them. Every rerun is listed, with the
# first failure's traceback, under "rerun test summary info", so a flaky test
# is seen and fixed, not hidden (README.md).
INTEROP_RERUNS = int(os.environ.get("CC_INTEROP_RERUNS", "1"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("interop") and not item.get_closest_marker("flaky"):
            item.add_marker(pytest.mark.flaky(reruns=INTEROP_RERUNS, reruns_delay=2))


def pytest_collection_finish(session):
    """Check, before the first test runs, every broker the selected
    differential tests will use (Redis always: results and records live
    there), so a missing broker ends the session at once, not mid-run."""
    needed = set()
    for item in session.items:
        if "broker" in getattr(item, "fixturenames", ()):
            needed.add("redis")
            callspec = getattr(item, "callspec", None)
            if callspec is not None and "broker" in callspec.params:
                needed.add(callspec.params["broker"])
    if "redis" in needed:
        url = harness.redis_base_url()
        why = harness.check_redis(url)
        if why:
            _broker_unreachable("redis", url, why)
    if "amqp" in needed:
        url = harness.amqp_url()
        why = harness.check_amqp(url)
        if why:
            _broker_unreachable("amqp", url, why)


@pytest.fixture(scope="session")
def redis_available() -> str:
    """Redis is needed in every mode: results and hook records live there."""
    url = harness.redis_base_url()
    why = harness.check_redis(url)
    if why:
        _broker_unreachable("redis", url, why)
    return url


@pytest.fixture(scope="session")
def amqp_broker_url(redis_available):
    """The AMQP broker URL for this session: a fresh vhost (see
    ``harness.RabbitVhost`` for why), deleted at the end of the session."""
    url = harness.amqp_url()
    why = harness.check_amqp(url)
    if why:
        _broker_unreachable("amqp", url, why)
    vhost = harness.RabbitVhost()
    if not vhost.available:
        yield url, True
        return
    try:
        vhost_url = vhost.create()
    except Exception as exc:
        vhost.delete()
        pytest.exit(f"could not create a RabbitMQ vhost with {vhost.ctl}: {exc}", returncode=3)
    try:
        yield vhost_url, False
    finally:
        vhost.delete()


@pytest.fixture(params=["redis", "amqp"])
def broker(request) -> harness.BrokerEnv:
    """The broker a differential scenario runs on, both flavours in turn."""
    if request.param == "redis":
        request.getfixturevalue("redis_available")
        return harness.BrokerEnv("redis", harness.redis_db_url(harness.BROKER_DB))
    url, shared = request.getfixturevalue("amqp_broker_url")
    return harness.BrokerEnv("amqp", url, fallback_shared_vhost=shared)


@pytest.fixture(scope="session")
def interop_log_dir() -> Path:
    return harness.default_log_dir()


@pytest.fixture(scope="module")
def worker_cache(interop_log_dir):
    cache = harness.WorkerCache(interop_log_dir)
    try:
        yield cache
    finally:
        cache.close()


@pytest.fixture
def run_differential(request, worker_cache):
    """``run_differential(scenario, broker, **worker_flags)`` for this module.

    A module may set ``WORKER_DEFAULTS`` (e.g. ``{"pool": "prefork",
    "concurrency": 2}``): flags its scenarios run with unless they pass their
    own. That is how one module re-runs another's scenarios on another pool
    by importing its test functions.
    """
    worker_cache.used = []
    request.node._cc_workers = worker_cache.used
    harness.LAST_RESULTS.clear()
    defaults = dict(getattr(request.module, "WORKER_DEFAULTS", {}))
    return functools.partial(harness.run_differential, cache=worker_cache, **defaults)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed:
        if len(harness.LAST_RESULTS) == 2 and harness.LAST_RESULTS[0] != harness.LAST_RESULTS[1]:
            first, second = harness.LAST_RESULTS
            report.sections.append(
                (f"{first.kind} vs {second.kind}: full diff of normalised observations",
                 first.diff(second))
            )
        # A side whose results timed out: its worker's threads, as it is now.
        waited = {obs.log_path for obs in harness.LAST_RESULTS
                  if any('"timeout":' in text for _, text in obs.items)}
        for worker in getattr(item, "_cc_workers", []):
            report.sections.append(
                (f"{worker.kind} worker log ({worker.broker.name}, {worker.log_path})",
                 worker.log_tail(60))
            )
            if str(worker.log_path) in waited:
                report.sections.append(
                    (f"{worker.kind} worker threads after a timed-out result (SIGUSR1)",
                     worker.dump_stacks()))
    return report


def pytest_assertrepr_compare(config, op, left, right):
    if op == "==" and isinstance(left, harness.Observations) \
            and isinstance(right, harness.Observations):
        return [
            f"{left.kind} observations differ from {right.kind} observations:",
            *left.summary(right),
            "(full diff in the report section below)",
        ]
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    kinds = harness.selected_kinds()
    ran_interop = any(
        rep.keywords.get("interop") for reps in terminalreporter.stats.values()
        for rep in reps if hasattr(rep, "keywords")
    )
    if ran_interop and len(kinds) == 1:
        terminalreporter.write_sep(
            "!", f"CC_WORKERS={kinds[0]}: only the {kinds[0]} side ran; "
                 "NO differential comparison was made", yellow=True,
        )
