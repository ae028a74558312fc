"""The Celery version matrix: the differential scenarios on every supported release.

ccworker under Celery X must behave as ``celery worker`` X. The interop
harness already compares against the ``celery worker`` of whatever Celery is
installed (both sides run with ``sys.executable``), so the matrix is the same
tests run with the Python of a venv per release, each holding that release
with the kombu and redis-py a deployment of it typically has (the oldest
ones included), plus ccworker from this checkout (editable, no deps).

Usage (``make test`` runs it after the main suite)::

    python tests/matrix.py                 # every release in STACKS but the newest
    python tests/matrix.py 5.2.7 5.5.3     # only these
    python tests/matrix.py --list          # the stacks and the tests each gets
    python tests/matrix.py --build-only    # build the venvs, run nothing

Venvs live in ``.venv-matrix/`` (or ``CC_MATRIX_DIR``) and are reused while
their stamp (the stack and the requirements below) is unchanged, so only the
first run on a machine pays for the installs. The newest release is the main
venv's and runs the whole suite there, so it is not repeated here.

Releases run one after the other (each run uses the Redis dbs and RabbitMQ
vhost of its pytest processes, which two runs at once would share), each on
``JOBS`` pytest-xdist processes. Exit status: 0 when every release passed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Celery, kombu, redis-py: the newest patch of every minor, with the oldest
#: kombu and redis-py a deployment of it runs (docs/compat.md, "Celery
#: versions"), and the Python it runs on: this one, except where the release
#: does not support it (Celery 5.2 predates Python 3.11: its worker fails to
#: log a task's traceback there, billiard 3.6 lacking ``co_positions``).
STACKS = {
    "5.2.7": ("5.2.4", "4.6.0", "3.10"),
    "5.3.6": ("5.3.7", "4.6.0", None),
    "5.4.0": ("5.4.2", "5.3.1", None),
    "5.5.3": ("5.5.4", "5.3.1", None),
    "5.6.3": ("5.6.0", "6.4.0", None),
    "5.7.0": ("5.7.0", "8.1.0", None),
}
#: The release the main venv (pyproject's ``test`` extra) runs: the full suite.
NEWEST = "5.7.0"

#: What every release gets (issue 13): the foundation, task-semantics,
#: events and control scenarios, on Redis and RabbitMQ.
TESTS = (
    "tests/interop/test_foundation_differential.py",
    "tests/interop/test_foundation_wire.py",
    "tests/interop/test_task_semantics.py",
    "tests/interop/test_events.py",
    "tests/interop/test_control.py",
    # The project's own bootsteps, ordered by each release's Blueprint graph
    # (issue 15): one pool per broker.
    "tests/interop/test_bootsteps.py::test_project_steps_run_as_in_celery[redis-prefork]",
    "tests/interop/test_bootsteps.py::test_project_steps_run_as_in_celery[amqp-threads]",
    # A task's own Request class: each release's hooks and their call graph
    # (on_failure's branches changed in 5.5-5.7).
    "tests/interop/test_project_requests.py::test_request_hooks_run_as_in_celery[prefork-redis]",
    # ``async def`` tasks against each release's synchronous twins: its Task
    # (autoretry's wrapper, the protected __call__) around ccworker's await,
    # on the pool with the most of ccworker around it (one loop, greenlets).
    "tests/interop/test_async_tasks.py::test_results_retries_and_signals[redis-asyncio]",
)

#: Scenarios a release's own *client* cannot run, so there is no behaviour of
#: its worker to compare: deselected for those releases, each with the reason
#: (docs/compat.md lists them too).
NOT_APPLICABLE = {
    "tests/interop/test_foundation_differential.py::test_kombu_json_types": (
        ("5.2.7",), "kombu 5.2's JSON has no type envelopes: its client cannot send "
                    "bytes (EncodeError) and sends datetimes as plain strings"),
    "tests/interop/test_foundation_wire.py::test_kombu_json_types": (
        ("5.2.7",), "as above"),
}

#: ccworker's own runtime dependencies (pyproject ``dependencies`` less the
#: ones the stack pins) and the test tools; the project's ``celery`` extras
#: the scenarios use.
RUNTIME = ("orjson>=3.9", "click>=8.1", "python-dateutil>=2.8.2", "hiredis", "gevent>=23.9",
           "prometheus_client>=0.17")
TEST_TOOLS = ("pytest>=7", "pytest-timeout>=2", "pytest-rerunfailures>=14",
              "pytest-xdist>=3.5", "hypothesis>=6")
CELERY_EXTRAS = "auth,redis,msgpack,yaml"


def matrix_dir() -> Path:
    return Path(os.environ.get("CC_MATRIX_DIR", ROOT / ".venv-matrix"))


def interpreter(celery: str) -> str:
    """The Python to build ``celery``'s venv with: pyenv's ``X.Y.*``, else
    ``pythonX.Y`` on PATH (not a pyenv shim, which fails for a version that is
    not selected), or this one when the stack names none."""
    wanted = STACKS[celery][2]
    if wanted is None:
        return sys.executable
    found = None
    for candidate in sorted(Path.home().glob(f".pyenv/versions/{wanted}.*/bin/python")):
        found = str(candidate)
    if found is None:
        on_path = shutil.which(f"python{wanted}")
        if on_path and "/shims/" not in on_path:
            found = on_path
    if found is None:
        raise SystemExit(f"matrix: celery {celery} needs Python {wanted}, which is not "
                         "installed (apt-get install python{wanted}-venv, or pyenv)")
    return found


def stamp_for(celery: str) -> str:
    text = json.dumps([celery, *STACKS[celery], RUNTIME, TEST_TOOLS, CELERY_EXTRAS,
                       sys.version_info[:2]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", *args], check=True)


def ensure_venv(celery: str) -> Path:
    """The venv for ``celery``'s stack, built (or rebuilt) when its stamp changed.

    Installs in the order a deployment of that release gets them: Celery,
    then the pinned kombu and redis-py (pip's resolver would otherwise take
    the newest the ranges allow), then ccworker from this checkout.
    """
    venv = matrix_dir() / f"celery-{celery}"
    stamp = venv / "ccmatrix.stamp"
    kombu, redis, _ = STACKS[celery]
    if not (stamp.is_file() and stamp.read_text() == stamp_for(celery)):
        print(f"matrix: building {venv} (celery {celery}, kombu {kombu}, redis {redis})",
              flush=True)
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([interpreter(celery), "-m", "venv", str(venv)], check=True)
        pip(venv, f"celery[{CELERY_EXTRAS}]=={celery}", *RUNTIME, *TEST_TOOLS)
        pip(venv, f"kombu=={kombu}", f"redis=={redis}")
        stamp.write_text(stamp_for(celery))
    # Editable and without deps: the checkout's code, the stack's versions.
    # Cheap, and redone every run so a venv follows the checkout it serves.
    pip(venv, "--no-deps", "-e", str(ROOT))
    return venv


def build_all(releases: list[str]) -> None:
    """Every release's venv, three builds at a time: a build is mostly
    waiting on downloads and unpacking, so they overlap well (about a
    minute for all five on a clean machine instead of three and a half)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as builders:
        for future in [builders.submit(ensure_venv, release) for release in releases]:
            future.result()


def run_release(celery: str, jobs: int, extra: list[str]) -> int:
    venv = matrix_dir() / f"celery-{celery}"  # built by build_all
    kombu, redis, _ = STACKS[celery]
    python = subprocess.run([str(venv / "bin" / "python"), "-c",
                             "import platform; print(platform.python_version())"],
                            capture_output=True, text=True, check=True).stdout.strip()
    print(f"\nmatrix: celery {celery}, kombu {kombu}, redis-py {redis}, Python {python}",
          flush=True)
    deselect = []
    for test, (releases, reason) in NOT_APPLICABLE.items():
        if celery in releases:
            print(f"matrix: not applicable on {celery}: {test} ({reason})", flush=True)
            deselect += ["--deselect", test]
    cmd = [str(venv / "bin" / "python"), "-m", "pytest", *TESTS, "-q",
           "-p", "no:cacheprovider", "-n", str(jobs), "--dist", "loadfile", *deselect, *extra]
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("releases", nargs="*", help="Celery releases (default: all but the newest)")
    parser.add_argument("--list", action="store_true", help="print the stacks and tests")
    parser.add_argument("--build-only", action="store_true", help="build the venvs only")
    parser.add_argument("-n", "--jobs", type=int, default=int(os.environ.get("JOBS", "4")))
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER,
                        help="after --: passed to pytest")
    args = parser.parse_args(argv)
    releases = args.releases or [r for r in STACKS if r != NEWEST]
    unknown = [r for r in releases if r not in STACKS]
    if unknown:
        parser.error(f"unknown release(s) {unknown}; known: {list(STACKS)}")
    if args.list:
        for release in STACKS:
            kombu, redis, python = STACKS[release]
            print(f"celery {release}: kombu {kombu}, redis-py {redis}, "
                  f"Python {python or 'of this venv'}")
        print("tests:", *TESTS, sep="\n  ")
        return 0
    started = time.monotonic()
    build_all(releases)
    print(f"matrix: venvs ready in {time.monotonic() - started:.0f} s", flush=True)
    if args.build_only:
        return 0
    extra = [a for a in args.pytest_args if a != "--"]
    results = {}
    for release in releases:
        started = time.monotonic()
        results[release] = (run_release(release, args.jobs, extra), time.monotonic() - started)
    print("\nmatrix summary:")
    for release, (code, seconds) in results.items():
        print(f"  celery {release}: {'passed' if code == 0 else f'FAILED ({code})'}"
              f" in {seconds:.0f} s")
    return 0 if all(code == 0 for code, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
