# The two commands a fresh clone needs (see README.md). Both bootstrap .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo cluster test test-quick lint

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

# Unit and interop tests (needs Redis and RabbitMQ, see README). Three parts:
# every module not marked `serial` on JOBS processes side by side (whole
# modules per process, so a module's shared workers stay one process's), then
# the Celery version matrix (tests/matrix.py: the differential scenarios under
# every older supported Celery, each in a venv it builds once and reuses) and,
# beside it, the `serial` modules (their own broker nodes, restarts, kills:
# they mostly wait, one process, on a Redis server of their own so the
# matrix's processes keep every database of the shared one).
# All parts always run; the target fails if any did. Steps 1 and 2 list
# their slowest tests (where to look when the budget is tight).
# tests/README.md has the time budget and the ways to run less.
# 5 processes, the most Redis's 16 databases isolate (three each; more get
# a redis-server each, tests/interop/redis_slots.py): the tests mostly wait
# on worker processes, so on 2 cores step 1 took 804 s on 5 against 997 s on
# 4 (2026-12-07, tests/README.md); on 7, 890 s against 984 s on 5 an hour
# apart, with both cores busy throughout (2% idle, median): little gained
# for a load that stretches every scenario's timing.
JOBS ?= 5
MATRIX_JOBS ?= 5
PYTEST := $(BIN)/python -m pytest

test: $(BIN)/ccworker
	$(BIN)/ruff check celerycompat tests benchmarks docker
	@status=0; serial_log=$$(mktemp); \
	$(PYTEST) tests -q -n $(JOBS) --dist loadfile -m "not serial" --durations=25 || status=$$?; \
	(CC_PRIVATE_REDIS=1 $(PYTEST) tests -q -m serial --durations=5 >$$serial_log 2>&1; \
	 echo "exit status $$?" >>$$serial_log) & serial=$$!; \
	$(BIN)/python tests/matrix.py -n $(MATRIX_JOBS) || status=$$?; \
	wait $$serial; echo "--- the serial modules, run beside the matrix:"; cat $$serial_log; \
	tail -n 1 $$serial_log | grep -qx "exit status 0" || status=1; \
	rm -f $$serial_log; exit $$status

# What to run before a commit (about 2 minutes): the unit tests and the
# foundation scenarios on both brokers.
test-quick: $(BIN)/ccworker
	$(BIN)/ruff check celerycompat tests benchmarks docker
	$(PYTEST) tests/unit tests/interop/test_foundation_differential.py \
		tests/interop/test_foundation_wire.py -q -n $(JOBS) --dist loadfile

lint: $(BIN)/ccworker
	$(BIN)/ruff check celerycompat tests benchmarks docker
