"""docker/compose.yaml and docker/Dockerfile, checked without a Docker engine.

``docker compose config`` is not available where the tests run, so this
checks what a broken edit would break: the services and their wiring, the
files the image copies and the commands refer to, and that the ccworker
service's command line is accepted by the real ``ccworker`` parser and is
the celery-worker service's command with the program name changed.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from celerycompat.cli import parse_worker_options

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
APP_SERVICES = {"celery-worker", "ccworker", "flower", "producer"}
OWN_FLAGS = ("--metrics-port", "--metrics-host")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dockerfile_copies() -> dict[str, Path]:
    """{destination in the image: source in the build context} of every COPY."""
    copies = {}
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY"):
            words = [w for w in shlex.split(line)[1:] if not w.startswith("--")]
            *sources, dest = words
            for source in sources:
                target = dest + Path(source).name if dest.endswith("/") else dest
                copies[target] = ROOT / source
    return copies


def test_services(compose):
    assert set(compose["services"]) == {"rabbitmq", "redis", *APP_SERVICES}
    for name, service in compose["services"].items():
        assert service.get("image"), name


def test_app_services_build_this_repository(compose):
    for name in APP_SERVICES:
        build = compose["services"][name]["build"]
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, name
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert "flower" in build["args"]["EXTRA_PACKAGES"]


def test_dependencies_exist_and_are_health_checked(compose):
    services = compose["services"]
    for name in APP_SERVICES:
        for dependency, rule in services[name]["depends_on"].items():
            assert dependency in services
            assert rule["condition"] == "service_healthy"
            assert services[dependency]["healthcheck"]["test"]
        environment = services[name]["environment"]
        for variable in ("BROKER_URL", "RESULT_BACKEND"):
            host = re.match(r"\w+://(?:[^@/]*@)?([^:/]+)", environment[variable]).group(1)
            assert host in services, (name, variable)


def test_published_ports_are_on_loopback(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_the_image_copies_files_that_exist(dockerfile_copies):
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    included = {rule[1:] for rule in ignore if rule.startswith("!")}
    assert "*" in ignore
    for dest, source in dockerfile_copies.items():
        assert source.exists(), (dest, source)
        relative = source.relative_to(ROOT).as_posix()
        # Everything is ignored but what is re-included: the source must be.
        assert any(relative == rule or relative.startswith(rule + "/") for rule in included), \
            relative
    assert (dockerfile_copies["/app/proj"] / "celery.py").exists()
    text = DOCKERFILE.read_text()
    assert re.search(r"^USER (?!root)\w+", text, re.M), "the image must not run as root"
    # The package from the copied sources, with the gevent extra (-P gevent).
    assert re.search(r'pip install "/src\[gevent\]"', text)


def test_commands_refer_to_what_the_image_holds(compose, dockerfile_copies):
    services = compose["services"]
    assert services["producer"]["entrypoint"] == ["python"]
    assert services["producer"]["command"][0] in dockerfile_copies
    for name in ("celery-worker", "ccworker", "flower"):
        command = services[name]["command"]
        assert command[:2] == ["-A", "proj"], name  # /app/proj, on PYTHONPATH
    assert services["celery-worker"]["entrypoint"] == services["flower"]["entrypoint"] == \
        ["celery"]
    assert "entrypoint" not in services["ccworker"]  # the image's: ccworker
    assert re.search(r'^ENTRYPOINT \["ccworker"\]', DOCKERFILE.read_text(), re.M)


def without_own_flags(command: list[str]) -> list[str]:
    out, skip = [], False
    for word in command:
        if skip:
            skip = False
        elif word in OWN_FLAGS:
            skip = True
        else:
            out.append(word)
    return out


def test_ccworker_runs_the_celery_workers_command_line(compose):
    services = compose["services"]
    celery_cmd = services["celery-worker"]["command"]
    cc_cmd = services["ccworker"]["command"]
    # Only the node name and ccworker's own flags differ.
    rename = {"celery-worker@%h": "ccworker@%h"}
    assert without_own_flags(cc_cmd) == [rename.get(w, w) for w in celery_cmd]
    port = cc_cmd[cc_cmd.index("--metrics-port") + 1]
    assert f"127.0.0.1:{port}:{port}" in services["ccworker"]["ports"]
    assert f"127.0.0.1:{port}/healthz" in " ".join(services["ccworker"]["healthcheck"]["test"])


def test_ccworker_command_is_accepted_by_the_ccworker_parser(compose, monkeypatch):
    monkeypatch.chdir(DOCKER / "example")
    environment = compose["x-app"]["environment"]
    # The parser exports -b/--result-backend (read from these) as CELERY_*
    # variables, as Celery does: set them here too so they are undone after.
    for name in ("BROKER_URL", "CELERY_BROKER_URL"):
        monkeypatch.setenv(name, environment["BROKER_URL"])
    for name in ("RESULT_BACKEND", "CELERY_RESULT_BACKEND"):
        monkeypatch.setenv(name, environment["RESULT_BACKEND"])
    modules, path = set(sys.modules), list(sys.path)
    try:
        options = parse_worker_options(compose["services"]["ccworker"]["command"])
    finally:
        for name in set(sys.modules) - modules:
            del sys.modules[name]
        sys.path[:] = path
    assert options.app.main == "proj"
    assert options.nodename.startswith("ccworker@")
    assert (options.concurrency, options.task_events) == (2, True)
    assert (options.observability.metrics_port, options.observability.metrics_host) == \
        (9808, "0.0.0.0")


def test_broker_credentials_are_the_rabbitmq_services(compose):
    rabbit = compose["services"]["rabbitmq"]["environment"]
    expected = f"amqp://{rabbit['RABBITMQ_DEFAULT_USER']}:{rabbit['RABBITMQ_DEFAULT_PASS']}@"
    for name in APP_SERVICES:
        assert compose["services"][name]["environment"]["BROKER_URL"].startswith(expected)
