# The two front-door commands: `make demo` and `make test` (each sets itself up first).
VENV ?= .venv
BIN := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test lint benchmark benchmark-privacy mlflow-ui

setup:
	@scripts/setup.sh

demo: setup
	$(BIN)/fedtune demo

# three workers on 2 cores, a test file per worker at a time (module fixtures are built once): about a
# third of the suite waits on servers, schedules and parties' processes, so a third worker fills the
# idle core time (3 workers measured fastest on 2 cores, README);
# TEST_WORKERS=N for a bigger machine. Coverage of fedtune/, flows/, tasks/ and mlflow_tracking/ at the end.
TEST_WORKERS ?= 3
test: setup .venv-flower/bin/flwr
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --cov --cov-report=term

lint: setup
	$(BIN)/ruff check . && $(BIN)/mypy

benchmark: setup
	$(BIN)/python benchmarks/overhead.py --steps 10 --clients 3

benchmark-privacy: setup .venv-flower/bin/flwr
	$(BIN)/python benchmarks/secagg_cost.py --clients 10 50 100 --length 460800 5000000 --flower .venv-flower/bin/python
	$(BIN)/python benchmarks/privacy_cost.py

mlflow-ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000

# Flower's pinned web stack conflicts with Prefect's, so its SecAgg+ runs in a venv of its own
.venv-flower/bin/flwr:
	scripts/install.sh .venv-flower flwr==1.42.0
