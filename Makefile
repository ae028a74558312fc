# The two commands a fresh clone needs (see README.md). Both bootstrap .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo cluster test lint

$(BIN)/ccworker: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# A ccworker on an embedded broker (no server) and a real Celery client.
demo: $(BIN)/ccworker
	$(BIN)/python docker/example/demo.py

# A celery worker, a ccworker and Flower on the local Redis, and a producer
# (docker/compose.yaml without Docker; docs/migration.md). Ctrl-C stops it all.
cluster: $(BIN)/ccworker
	$(BIN)/python docker/cluster.py

# Unit and interop tests (needs Redis and RabbitMQ, see README).
test: $(BIN)/ccworker
	$(BIN)/ruff check celerycompat tests benchmarks docker
	$(BIN)/python -m pytest tests -q

lint: $(BIN)/ccworker
	$(BIN)/ruff check celerycompat tests benchmarks docker
